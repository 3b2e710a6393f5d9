"""Step 1 of the alignment demo: a ~1M-parameter LLaMA pretrained on the letters task's text
(`llama_jax.data.preference_demo`: words of six kinds in three letter cases, and chats that answer
requests in a random case), with a 512-piece tokenizer trained on it on first use. A minute or two
on 2 CPU cores:

  python train.py --config configs/letters_tiny.py --workdir runs/letters
  python train.py --config configs/letters_sft_tiny.py --workdir runs/letters_sft
  python train.py --config configs/reward_tiny.py --workdir runs/letters_rm
  python train.py --config configs/ppo_tiny.py --workdir runs/letters_ppo
  python train.py --config configs/dpo_tiny.py --workdir runs/letters_dpo
  python -m llama_jax.align check --model runs/letters_dpo   # share of answers in the requested case

Every config of the chain takes its model shape from here.
"""

import ml_collections

from configs import tiny
from llama_jax.data.config import source


def get_config():
  config = tiny.get_config()
  config.model.dim = 128
  config.model.n_layers = 4
  config.model.n_heads = 4
  config.model.n_kv_heads = 2
  config.model.multiple_of = 32
  config.model.vocab_size = 512  # data.vocab_size follows: the tokenizer is trained to this size
  config.model.max_seq_len = 128
  config.num_steps = 400
  config.batch_size = 32
  config.seq_len = 64
  config.log_every = 20
  config.eval_every = 200
  config.checkpoint_every = 200
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 40
  config.data.sources = ml_collections.ConfigDict(dict(text=source("demo:letters_text", 1.0)))
  config.data.tokenizer_train_chars = 2_000_000
  return config
