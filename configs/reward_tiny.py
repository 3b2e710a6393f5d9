"""Step 3 of the alignment demo: a reward model for the letters task (the answer in the requested
letter case against another case), from the SFT model of `configs/letters_sft_tiny.py`; every 10th
pair is held out for eval/accuracy.

  python train.py --config configs/reward_tiny.py --workdir runs/letters_rm
"""

import ml_collections

from configs import letters_tiny, reward
from llama_jax.data.config import source


def get_config():
  config = reward.get_config()
  config.model = letters_tiny.get_config().model
  config.data.vocab_size = config.model.get_ref("vocab_size")
  config.init_from = "runs/letters_sft"
  config.num_steps = 400
  config.batch_size = 32
  config.seq_len = 64
  config.log_every = 10
  config.eval_every = 100
  config.checkpoint_every = 0
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_ratio = 0.1
  config.data.sources = ml_collections.ConfigDict(dict(pairs=source("demo:letters_prefs", 1.0)))
  config.data.holdout_every = 10
  config.data.eval_batches = 4
  return config
