"""Pretrain, fine-tune or align: python train.py --config configs/tiny.py --workdir runs/tiny [--config.x=...]

config.recipe says what is trained: "lm" (default), "reward", "dpo" or "ppo" (llama_jax.align).

The command line is `llama_jax.train.cli` (`--help` lists the config's fields); the run is
`llama_jax.train.train_and_evaluate`.
"""

from llama_jax.train.cli import main

if __name__ == "__main__":
  main()
