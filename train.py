"""Pretrain or fine-tune: python train.py --config configs/tiny.py --workdir runs/tiny [--config.x=...]

The command line is `llama_jax.train.cli` (`--help` lists the config's fields); the run is
`llama_jax.train.train_and_evaluate`.
"""

from llama_jax.train.cli import main

if __name__ == "__main__":
  main()
