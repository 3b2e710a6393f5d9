"""The embedded default: a ~5M-parameter LLaMA trained on Python's own sources and documentation.

About 10 minutes on 2 CPU cores: `python train.py --config configs/tiny.py --workdir runs/tiny`.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.num_steps = 600
  config.batch_size = 16
  config.seq_len = 128
  config.log_every = 20
  config.eval_every = 200
  config.data.eval_batches = 4
  config.checkpoint_every = 200
  config.optimizer.lr = 2e-3  # small models take a large learning rate
  config.optimizer.warmup_steps = 50
  return config
