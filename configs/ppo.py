"""The `ppo` recipe: RLHF with PPO against a reward model, a per-token KL penalty to the SFT model
(InstructGPT, Ouyang et al. 2022), with TRL's PPO defaults (KL 0.05, clip 0.2, value clip 0.2,
value coefficient 0.1, γ 1, λ 0.95, 4 epochs per rollout batch).

  python train.py --config configs/ppo.py --workdir runs/ppo_7b --config.init_from=/path/to/sft-7b \\
      --config.ppo.reward_model=runs/rm_7b --config.data.sources.prompts.path=prompts.jsonl

`batch_size` is prompts per rollout batch; a step is one rollout batch and its updates.
`ppo.advantage="grpo"` (with `ppo.group_size` > 1) is GRPO: group-relative advantages, no critic.
"""

import ml_collections

from configs import reward
from llama_jax.data.config import source


def get_config():
  config = reward.get_config()
  config.recipe = "ppo"
  config.num_steps = 1000  # rollout batches
  config.batch_size = 64  # prompts per rollout batch
  config.eval_every = 100  # eval/reward_mean and eval/kl of greedy answers to held-out prompts
  config.data.eval_batches = 2
  config.optimizer.lr = 3e-6
  config.optimizer.warmup_ratio = 0.0
  config.optimizer.warmup_steps = 0  # optimiser updates (ppo.epochs x ppo.minibatches per step)
  config.data.sources = ml_collections.ConfigDict(dict(prompts=source("", 1.0, template="vicuna_v1.1")))

  config.ppo = ml_collections.ConfigDict()
  config.ppo.reward_model = ""  # required: a reward run's workdir (configs/reward.py)
  config.ppo.prompt_len = 512  # prompt tokens (right-padded); longer prompts are skipped and counted
  config.ppo.max_new_tokens = 256  # answer tokens per rollout
  config.ppo.temperature = 1.0  # rollout sampling; the log-probs (ratio, KL) are taken at it too
  config.ppo.top_k = 0
  config.ppo.top_p = 1.0
  config.ppo.group_size = 1  # samples per prompt (grpo: the group)
  config.ppo.epochs = 4  # optimisation passes over each rollout batch
  config.ppo.minibatches = 2  # updates per pass
  config.ppo.advantage = "gae"  # "gae" (PPO, value head) or "grpo" (group-relative, no critic)
  # How a minibatch's token losses are averaged: "token" (all response tokens alike), "sequence"
  # (each answer's tokens, then the answers: GRPO's eq. 3), "auto" (sequence for grpo, token for gae).
  config.ppo.loss_type = "auto"
  config.ppo.kl_coef = 0.05  # gae: per-token KL penalty in the reward; grpo: weight of the k3 KL loss
  config.ppo.gamma = 1.0
  config.ppo.lam = 0.95
  config.ppo.clip = 0.2  # the policy ratio's clip range
  config.ppo.value_clip = 0.2  # the value's clip range around the rollout's value
  config.ppo.vf_coef = 0.1  # weight of the value loss
  config.ppo.whiten_advantages = True
  config.ppo.scale_rewards = True  # grpo: divide by the group's standard deviation
  return config
