"""Benchmarks, one module each; the last line each prints is one JSON object.

  python -m llama_jax.bench train --config configs/tinyllama_1b.py [--config.key=value ...]
      the real train_step, sharding and optimiser on synthetic tokens (`bench.train`)
  python -m llama_jax.bench decode --config configs/tinyllama_1b.py --batch_size B --prompt_len P --new_tokens N
      [--quantize int8|int4 --group_size G] [--fuse=false]
      the real generation engine on random weights, float or weight-only quantized (`bench.decode`)
  python -m llama_jax.bench quantize --config configs/tinyllama_1b.py --bits 4 --method gptq [--group_size 128]
      [--calibration_samples 128 --calibration_len 2048 --act_order]
      the time of quantizing a whole model, GPTQ or round-to-nearest (`bench.quantize`)
  python -m llama_jax.bench dpo --config configs/dpo_tinyllama_1b.py
      the real DPO step (policy and frozen reference) on synthetic pairs (`bench.dpo`)
  python -m llama_jax.bench ppo --config configs/ppo_tinyllama_1b.py
      PPO's rollout, scoring, update and whole step on random weights (`bench.ppo`)
  python -m llama_jax.bench data [...]
      the data pipeline's tokens/s and memory on this machine (`bench.data`)
  python -m llama_jax.bench convert [...]
      time and peak memory of checkpoint conversion (`bench.convert`)

LoRA training: `bench train` with `--config.lora.rank=R` (and `--config.lora.quantize_base=int4`
for QLoRA) against the same command without it.
`--profile_dir DIR` (train, decode, quantize, dpo, ppo) writes a jax.profiler trace; `benchmarks/profile_summary.py`
summarises it. GPU tables in BENCHMARKS.md come from `benchmarks/gpu.sh`.

Configs are files: a relative `--config` is found from the working directory (the default, from
the repository's root), and a missing one is one line naming the path tried.
"""

from __future__ import annotations

import json
import sys


DEFAULT_CONFIG = "configs/tinyllama_1b.py"


def _train_or_decode(kind: str, argv: list[str]) -> None:
  from absl import app, flags
  from ml_collections import config_flags

  from llama_jax.train.cli import parse_flags

  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file.", lock_config=True)
  flags.DEFINE_integer("warmup", 3, "train, dpo: untimed steps (compilation).")
  flags.DEFINE_integer("steps", 10, "train, dpo, ppo: timed steps.")
  flags.DEFINE_integer("batch_size", 1, "decode: prompts per batch.")
  flags.DEFINE_integer("prompt_len", 128, "decode: prompt tokens.")
  flags.DEFINE_integer("new_tokens", 256, "decode: tokens generated per prompt.")
  flags.DEFINE_integer("repeats", 5, "decode: timed repetitions (median).")
  flags.DEFINE_string("quantize", "", "decode: int8 or int4 weight-only projections (default: none).")
  flags.DEFINE_integer("group_size", None, "decode, quantize: inputs per quantization group "
                       "(0: per output channel; default 0 at 8 bits, 128 at 4).")
  flags.DEFINE_integer("bits", 4, "quantize: 4 or 8.")
  flags.DEFINE_string("method", "gptq", "quantize: gptq or rtn.")
  flags.DEFINE_integer("calibration_samples", 128, "quantize: calibration windows.")
  flags.DEFINE_integer("calibration_len", 2048, "quantize: tokens per calibration window.")
  flags.DEFINE_bool("act_order", False, "quantize: GPTQ's act-order.")
  flags.DEFINE_integer("calibration_batch", 8, "quantize: calibration windows per forward pass.")
  flags.DEFINE_bool("fuse", True, "decode: wq|wk|wv and w1|w3 as one matmul each (engine.fuse_layer).")
  flags.DEFINE_string("profile_dir", "", "Write a jax.profiler trace of the timed region here.")
  FLAGS = flags.FLAGS

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
    from llama_jax.errors import run_cli
    if kind == "train":
      from llama_jax.bench.train import bench_train
      result = run_cli(lambda: bench_train(FLAGS.config, FLAGS.warmup, FLAGS.steps, FLAGS.profile_dir))
    elif kind == "dpo":
      from llama_jax.bench.dpo import bench_dpo
      result = run_cli(lambda: bench_dpo(FLAGS.config, FLAGS.warmup, FLAGS.steps, FLAGS.profile_dir))
    elif kind == "ppo":
      from llama_jax.bench.ppo import bench_ppo
      result = run_cli(lambda: bench_ppo(FLAGS.config, FLAGS.warmup, FLAGS.steps, FLAGS.profile_dir))
    elif kind == "quantize":
      from llama_jax.bench.quantize import bench_quantize
      group = FLAGS.group_size if FLAGS.group_size is not None else (128 if FLAGS.bits == 4 else 0)
      result = run_cli(lambda: bench_quantize(
          FLAGS.config, FLAGS.bits, FLAGS.method, group, FLAGS.calibration_samples,
          FLAGS.calibration_len, FLAGS.act_order, FLAGS.calibration_batch, FLAGS.profile_dir))
    else:
      from llama_jax.bench.decode import bench_decode
      result = run_cli(lambda: bench_decode(FLAGS.config, FLAGS.batch_size, FLAGS.prompt_len,
                                            FLAGS.new_tokens, FLAGS.repeats, FLAGS.profile_dir,
                                            FLAGS.fuse, FLAGS.quantize, FLAGS.group_size))
    print(json.dumps(result))

  app.run(run, argv=[f"llama_jax.bench {kind}"] + argv,
          flags_parser=lambda args: parse_flags(args, default_config=DEFAULT_CONFIG))


def main(argv: list[str]) -> int:
  kinds = ("train", "decode", "quantize", "dpo", "ppo", "data", "convert")
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
