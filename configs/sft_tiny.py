"""The `sft` recipe on the CPU demo: fine-tunes the tiny model of `configs/tiny.py` into a chat
model on a generated conversation file (`llama_jax.data.sft_demo`: questions about Python's
built-ins, answered with their docstrings), in a few minutes on 2 CPU cores.

  python train.py --config configs/tiny.py --workdir runs/tiny
  python train.py --config configs/sft_tiny.py --workdir runs/tiny_chat
  python generate.py --checkpoint runs/tiny_chat --chat --temperature 0

`init_from` names the checkpoint to start from (any kind `llama_jax.load` reads); its
tokenizer.model is used, as data.tokenizer is left empty.
"""

import ml_collections

from configs import sft, tiny
from llama_jax.data.config import source


def get_config():
  config = sft.get_config()
  base = tiny.get_config()
  config.model = base.model  # the shape of configs/tiny.py
  config.data.vocab_size = config.model.get_ref("vocab_size")
  config.init_from = "runs/tiny"
  config.batch_size = 16
  config.seq_len = 128
  config.log_every = 10
  config.checkpoint_every = 0
  config.optimizer.lr = 1e-3  # a small model on little data takes a larger learning rate
  config.data.sources = ml_collections.ConfigDict(dict(
      chat=source("demo:chat", 1.0, epochs=20, format="sharegpt", template="vicuna_v1.1")))
  return config
