"""Step 4 of the alignment demo: PPO of the SFT model of `configs/letters_sft_tiny.py` against the
reward model of `configs/reward_tiny.py`, on the letters task's requests.

  python train.py --config configs/ppo_tiny.py --workdir runs/letters_ppo
  python -m llama_jax.align check --model runs/letters_ppo
"""

import ml_collections

from configs import letters_tiny, ppo
from llama_jax.data.config import source


def get_config():
  config = ppo.get_config()
  config.model = letters_tiny.get_config().model
  config.data.vocab_size = config.model.get_ref("vocab_size")
  config.init_from = "runs/letters_sft"
  config.ppo.reward_model = "runs/letters_rm"
  config.num_steps = 60
  config.batch_size = 32
  config.seq_len = 64
  config.log_every = 5
  config.eval_every = 20
  config.checkpoint_every = 0
  config.optimizer.lr = 3e-4
  config.ppo.prompt_len = 56
  config.ppo.max_new_tokens = 8
  config.ppo.kl_coef = 0.2  # the tiny reward model's scores span about ±8
  config.data.sources = ml_collections.ConfigDict(dict(prompts=source("demo:letters_prompts", 1.0)))
  config.data.holdout_every = 10
  return config
