"""Pretrain, fine-tune or align: python train.py --config configs/tiny.py --workdir runs/tiny [--config.x=...]

config.recipe says what is trained: "lm" (default), "reward", "dpo" or "ppo" (llama_jax.align).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from llama_jax.errors import run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from llama_jax.align import get_recipe  # config.recipe -> what the loop trains
  from llama_jax.train import TrainingError, train_and_evaluate
  config = _CONFIG.value
  run_cli(lambda: train_and_evaluate(config, _WORKDIR.value, get_recipe(config)), expected=(TrainingError,))


def parse_flags(argv):
  """absl's parser, with a bad `--config.x=...` override (unknown key, wrong type) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    print(f"error: bad configuration override: {e}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
