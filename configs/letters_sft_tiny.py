"""Step 2 of the alignment demo: chat fine-tuning of `configs/letters_tiny.py`'s model on the letters
task's conversations, whose answers take a random letter case whatever the request asks (SFT data of
mixed quality: the tuned model follows about a third of the requests).

  python train.py --config configs/letters_sft_tiny.py --workdir runs/letters_sft
"""

import ml_collections

from configs import letters_tiny, sft_tiny
from llama_jax.data.config import source


def get_config():
  config = sft_tiny.get_config()
  base = letters_tiny.get_config()
  config.model = base.model
  config.data.vocab_size = config.model.get_ref("vocab_size")
  config.init_from = "runs/letters"
  config.batch_size = 32
  config.seq_len = 64
  config.log_every = 20
  config.optimizer.lr = 1e-3
  config.data.sources = ml_collections.ConfigDict(dict(
      chat=source("demo:letters_chat", 1.0, epochs=2, format="sharegpt", template="vicuna_v1.1")))
  return config
