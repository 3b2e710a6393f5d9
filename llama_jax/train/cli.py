"""`python train.py`: the config file and its overrides, each mistake one line, and `--help`.

  python train.py --config configs/tiny.py --workdir runs/tiny [--config.optimizer.lr=1e-3 ...]

The config is an ml-collections file (`config_flags.DEFINE_config_file`); this module checks what
absl reports badly: a config file that does not exist (the path it tried, not "config_config"), an
unknown key in an override (which key, and the close ones), a config file that fails to load. A
config file may import its siblings as a package (`from configs import default`): the package's
parent goes on `sys.path`, so a config runs from any directory. `python -m llama_jax.bench` parses
its configs here too.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any, Sequence

from llama_jax.errors import UsageError, run_cli

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "default.py")


def flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of --name=VALUE or --name VALUE in argv (the last one), if any."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def check_config_file(argument: str) -> str:
  """The config file of `--config FILE[:ARGS]`, resolved against the working directory; its
  package's parent goes on sys.path (the configs import each other as a package)."""
  path = os.path.abspath(argument.split(":", 1)[0])
  if not os.path.isfile(path):
    raise UsageError(f"--config {argument}: no such file ({path})")
  directory = os.path.dirname(path)
  if os.path.isfile(os.path.join(directory, "__init__.py")):
    root = os.path.dirname(directory)
    if root not in sys.path:
      sys.path.insert(0, root)
  return path


def load_config(argument: str) -> Any:
  """The config of a `--config FILE[:ARGS]` argument: FILE's get_config(ARGS)."""
  path, *args = argument.split(":", 1)
  spec = importlib.util.spec_from_file_location("llama_jax_checked_config", os.path.abspath(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def unknown_key(config: Any, overrides: Sequence[str]) -> str | None:
  """The first `--config.a.b=...` whose path the config does not have, as one line."""
  for arg in overrides:
    parts = arg[len("--config."):].split("=", 1)[0].split(".")
    node, where = config, "the config"
    for depth, key in enumerate(parts):
      if not hasattr(node, "keys"):
        return f"--config.{'.'.join(parts)}: {where} is a value, not a block of keys"
      keys = sorted(node.keys())
      if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"its keys: {', '.join(keys)}"
        return f"--config.{'.'.join(parts)}: {where} has no key '{key}'; {hint}"
      node, where = node[key], ".".join(parts[:depth + 1])
  return None


def parse_flags(argv: list[str], help_text: str | None = None, default_config: str | None = None) -> list[str]:
  """absl's parser (for `app.run(..., flags_parser=...)`), with --help on stdout (exit 0) and every
  mistake in the config file (`--config`, else `default_config`) or its overrides as one line
  (exit 2)."""
  if help_text is not None and any(a in HELP_FLAGS for a in argv[1:]):
    print(help_text)
    sys.exit(0)
  return run_cli(lambda: _parse(argv, default_config))


def _parse(argv: list[str], default_config: str | None) -> list[str]:
  from absl import flags
  config = flag_value(argv[1:], "config") or default_config
  if config:
    check_config_file(config)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise UsageError(str(e).splitlines()[0]) from None
  except Exception as e:  # noqa: BLE001 -- an override absl could not apply, or the file itself
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    try:
      message = unknown_key(load_config(config), overrides) if config else None
    except Exception as load_error:  # noqa: BLE001 -- the config file fails on its own
      e, message = load_error, None
    if message is None:
      last = " ".join(str(e).strip().splitlines()[-1:]) or type(e).__name__
      message = f"--config {config}: {type(e).__name__}: {last}"
    raise UsageError(message) from None


def config_fields(path: str = DEFAULT_CONFIG) -> list[tuple[str, str, str]]:
  """(field, value as written, comment) for every `config.x = ...` of a config file: the comment
  at the end of the line, or the comment lines just above it."""
  fields, pending = [], []
  with open(path) as f:
    for line in f:
      text = line.strip()
      if text.startswith("#"):
        pending.append(text.lstrip("# "))
        continue
      if text.startswith("config.") and "=" in text:
        name, rest = (part.strip() for part in text[len("config."):].split("=", 1))
        value, _, comment = rest.partition("  #")
        if value.strip() != "ml_collections.ConfigDict()":  # a block: its fields follow
          fields.append((name, value.strip(), comment.strip() or " ".join(pending)))
      pending = []
  return fields


def help_text() -> str:
  lines = [
      "Pretrain, fine-tune or align a LLaMA model (config.recipe: lm, reward, dpo, ppo).",
      "",
      "usage: python train.py --config CONFIG.py --workdir DIR [--config.FIELD=VALUE ...]",
      "",
      "  --config   a config file: configs/tiny.py, configs/tinyllama_1b.py, configs/sft_tiny.py, ...",
      "  --workdir  checkpoints, metrics, TensorBoard events, the tokenizer; the same command resumes",
      "",
      "Any config field can be overridden: --config.optimizer.lr=1e-3 --config.model.n_layers=8",
  ]
  if not os.path.isfile(DEFAULT_CONFIG):
    return "\n".join(lines + ["The fields and what they do: configs/default.py in the repository."])
  fields = config_fields()
  width = min(max(len(f"{name} = {value}") for name, value, _ in fields), 34) + 2
  lines += ["", f"The fields ({os.path.relpath(DEFAULT_CONFIG)}; the data block: llama_jax/data/config.py):"]
  for name, value, comment in fields:
    lines.append(f"  {f'{name} = {value}':<{width - 1}} {comment}".rstrip())
  return "\n".join(lines)


def main() -> None:
  from absl import app, flags
  from ml_collections import config_flags

  from llama_jax.errors import run_cli

  config = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
  flags.mark_flags_as_required(["config", "workdir"])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from llama_jax.align import get_recipe  # config.recipe -> what the loop trains
    from llama_jax.train import TrainingError, train_and_evaluate
    try:
      run_cli(lambda: train_and_evaluate(config.value, workdir.value, get_recipe(config.value)),
              expected=(TrainingError,))
    except KeyboardInterrupt:  # a second Ctrl-C, while the first one's checkpoint was being saved
      print("interrupted again: exiting without saving", file=sys.stderr)
      sys.exit(130)

  app.run(run, flags_parser=lambda argv: parse_flags(argv, help_text()))
