"""Settings of the fused decode blocks (`llama_jax.kernels.decode_block`'s module constants) against
each other, measured on one GPU:

  python benchmarks/decode_variants.py [--config configs/tinyllama_1b.py] [--batch_size 16]
      [--prompt_len 128] [--variants "xla;BATCH_KERNELS=;BATCH_KERNELS=wo_t,w2_t"] [--processes 3]

A variant is "xla" (XLA's blocks: `model.decode_kernels=xla`) or NAME=VALUE overrides of
decode_block's constants, comma lists for sets (BATCH_KERNELS: the products a batch step runs as
`matvec` kernels), integers (ATTENTION_SPLIT: cache positions one attention program reads at most
below SPLIT_BELOW_PROGRAMS programs, 0 for no limit);
matvec's constants as `matvec.NAME`; several joined with "&". Each runs `bench decode` (the prompt,
then 256 new tokens) in a process of its own, and the list runs `--processes` times over: XLA autotunes its GEMMs in every process and its
picks (so a step's time) differ from one process to the next (batch 16 on XLA's blocks: 1.49 or
1.63 ms on H100s), while within one process every later run reuses the first one's picks. One JSON
line a run: the variant, the round, and the decode's figures. `--autotune_cache DIR` makes every
run share one set of picks (the first run's), so that the variants differ only where they differ.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def apply(variant: str):
  """Sets the kernels' constants as `variant` says; returns the config's decode_kernels."""
  from llama_jax.kernels import decode_block, matvec
  if variant == "xla":
    return "xla"
  for override in filter(None, variant.split("&")):
    name, value = override.split("=", 1)
    module = matvec if name.startswith("matvec.") else decode_block
    name = name.removeprefix("matvec.")
    current = getattr(module, name)  # an unknown name fails here
    if isinstance(current, bool):
      setattr(module, name, value == "1")
    elif isinstance(current, int):
      setattr(module, name, int(value))
    else:
      setattr(module, name, frozenset(filter(None, value.split(","))))
  return "auto"


def one(config_path: str, batch_size: int, variant: str, quantize: str = "", prompt_len: int = 128) -> dict:
  from llama_jax.bench.decode import bench_decode
  from llama_jax.train.cli import load_config
  kernels = apply(variant)
  config = load_config(config_path)
  config.model.decode_kernels = kernels
  return bench_decode(config, batch_size, prompt_len, 256, quantize=quantize)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/tinyllama_1b.py")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=128, help="each row's prompt (then 256 new tokens)")
  p.add_argument("--variants", default="xla;BATCH_KERNELS=;BATCH_KERNELS=wo_t,w2_t",
                 help="';'-separated variants (see above)")
  p.add_argument("--processes", type=int, default=3, help="rounds over the list, a process a run")
  p.add_argument("--quantize", default="", help="int8 or int4: the weights quantized (bench decode's)")
  p.add_argument("--autotune_cache", default="", help="a directory: every run shares XLA's autotuned "
                 "picks through it (--xla_gpu_per_fusion_autotune_cache_dir; the first run tunes)")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: one variant
  args = p.parse_args()
  if args.one is not None:
    print(json.dumps(one(args.config, args.batch_size, args.one, args.quantize, args.prompt_len)), flush=True)
    return
  for round_ in range(args.processes):
    for variant in args.variants.split(";"):
      child = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--batch_size",
               str(args.batch_size), "--prompt_len", str(args.prompt_len), "--quantize", args.quantize,
               "--one", variant]
      env = dict(os.environ)
      if args.autotune_cache:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_gpu_per_fusion_autotune_cache_dir={args.autotune_cache}").strip()
      proc = subprocess.run(child, capture_output=True, text=True, env=env)
      lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
      result = json.loads(lines[-1]) if lines else {"error": proc.stderr[-500:]}
      print(json.dumps({"variant": variant, "round": round_, "autotune_cache": bool(args.autotune_cache),
                        **result}), flush=True)


if __name__ == "__main__":
  main()
