"""Benchmarks, one module each; the last line each prints is one JSON object.

  python -m llama_jax.bench train --config configs/tinyllama_1b.py [--config.key=value ...]
      the real train_step, sharding and optimiser on synthetic tokens (`bench.train`)
  python -m llama_jax.bench decode --config configs/tinyllama_1b.py --batch_size B --prompt_len P --new_tokens N
      the real generation engine on random weights (`bench.decode`)
  python -m llama_jax.bench dpo --config configs/dpo_tinyllama_1b.py
      the real DPO step (policy and frozen reference) on synthetic pairs (`bench.dpo`)
  python -m llama_jax.bench ppo --config configs/ppo_tinyllama_1b.py
      PPO's rollout, scoring, update and whole step on random weights (`bench.ppo`)
  python -m llama_jax.bench data [...]
      the data pipeline's tokens/s and memory on this machine (`bench.data`)
  python -m llama_jax.bench convert [...]
      time and peak memory of checkpoint conversion (`bench.convert`)

`--profile_dir DIR` (train, decode) writes a jax.profiler trace; `benchmarks/profile_summary.py`
summarises it. GPU tables in BENCHMARKS.md come from `benchmarks/gpu.sh`.
"""

from __future__ import annotations

import json
import sys


def _train_or_decode(kind: str, argv: list[str]) -> None:
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", "configs/tinyllama_1b.py", "Config file.", lock_config=True)
  flags.DEFINE_integer("warmup", 3, "train: untimed steps (compilation).")
  flags.DEFINE_integer("steps", 10, "train: timed steps.")
  flags.DEFINE_integer("batch_size", 1, "decode: prompts per batch.")
  flags.DEFINE_integer("prompt_len", 128, "decode: prompt tokens.")
  flags.DEFINE_integer("new_tokens", 256, "decode: tokens generated per prompt.")
  flags.DEFINE_integer("repeats", 5, "decode: timed repetitions (median).")
  flags.DEFINE_string("profile_dir", "", "Write a jax.profiler trace of the run here.")
  FLAGS = flags.FLAGS

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
    import contextlib

    import jax
    from llama_jax.errors import run_cli
    trace = jax.profiler.trace(FLAGS.profile_dir) if FLAGS.profile_dir else contextlib.nullcontext()
    with trace:
      if kind == "train":
        from llama_jax.bench.train import bench_train
        result = run_cli(lambda: bench_train(FLAGS.config, FLAGS.warmup, FLAGS.steps))
      elif kind == "dpo":
        from llama_jax.bench.dpo import bench_dpo
        result = run_cli(lambda: bench_dpo(FLAGS.config, FLAGS.warmup, FLAGS.steps))
      elif kind == "ppo":
        from llama_jax.bench.ppo import bench_ppo
        result = run_cli(lambda: bench_ppo(FLAGS.config, FLAGS.warmup, FLAGS.steps))
      else:
        from llama_jax.bench.decode import bench_decode
        result = run_cli(lambda: bench_decode(FLAGS.config, FLAGS.batch_size, FLAGS.prompt_len,
                                              FLAGS.new_tokens, FLAGS.repeats))
    print(json.dumps(result))

  app.run(run, argv=[f"llama_jax.bench {kind}"] + argv)


def main(argv: list[str]) -> int:
  kinds = ("train", "decode", "dpo", "ppo", "data", "convert")
  if not argv or argv[0] not in kinds:
    print(f"usage: python -m llama_jax.bench {{{'|'.join(kinds)}}} [flags]", file=sys.stderr)
    return 2
  kind, rest = argv[0], argv[1:]
  if kind == "data":
    from llama_jax.bench import data
    return data.main(rest)
  if kind == "convert":
    from llama_jax.bench import convert
    return convert.main(rest)
  _train_or_decode(kind, rest)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
