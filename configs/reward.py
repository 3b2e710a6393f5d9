"""The `reward` recipe: a reward model on preference pairs (InstructGPT §3.5 and appendix C.2 trained
6B reward models for one epoch at 9e-6 with a cosine schedule; TRL's RewardTrainer: 1e-5, one epoch),
the Bradley-Terry loss on a score head over the last token of each answer.

  python train.py --config configs/reward.py --workdir runs/rm_7b \\
      --config.init_from=/path/to/sft-7b --config.data.sources.pairs.path=prefs.jsonl

`init_from` is the SFT model (its output head is dropped); the data are preference records
(`llama_jax.align.data`). The result loads with `llama_jax.align.load_reward_model` and exports to
transformers as LlamaForSequenceClassification (`python -m llama_jax.align export`).
"""

import ml_collections

from configs import default
from llama_jax.config import preset, to_config_dict
from llama_jax.data.config import source


def get_config():
  config = default.get_config()
  config.recipe = "reward"
  config.model = to_config_dict(preset("llama_7b"))
  config.data.vocab_size = config.model.get_ref("vocab_size")
  config.init_from = ""  # required in practice: the SFT model
  config.num_steps = 0  # one epoch of the pairs
  config.batch_size = 64  # pairs per step
  config.seq_len = 1024  # a side holds at most seq_len + 1 tokens; longer pairs are skipped and counted
  config.log_every = 10
  config.eval_every = 100  # rm/... and eval/loss, eval/accuracy, eval/margin on held-out pairs
  config.checkpoint_every = 500

  config.optimizer.lr = 9e-6
  config.optimizer.warmup_ratio = 0.03
  config.optimizer.min_lr_ratio = 0.0
  config.optimizer.weight_decay = 0.0
  config.optimizer.b2 = 0.999

  # Preference records, rendered with the chat template; one epoch; every 20th record held out.
  config.data.sources = ml_collections.ConfigDict(dict(
      pairs=source("", 1.0, epochs=1, template="vicuna_v1.1")))
  config.data.holdout_every = 20
  config.data.eval_batches = 8
  return config
