"""The training benchmark with module constants of the library set first, each run its own process:

  python benchmarks/train_variants.py [--rounds 2] --variants "base;model.NAME=VALUE" \
      -- --config configs/tinyllama_1b.py [--config.key=value ...]

A variant is "base" (nothing set) or MODULE.NAME=VALUE pairs joined with "&" (MODULE under
llama_jax, VALUE a Python literal). The list runs `--rounds` times over, so that the variants
alternate and a drift of the card (clocks, a neighbour's load) falls on each alike. Everything
after "--" goes to `python -m llama_jax.bench train`. One JSON line a run: the variant, the round,
and the benchmark's figures.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_variant(variant: str, bench_args: list[str]) -> None:
  """In this process: set the variant's constants, then run the benchmark (its last line, JSON)."""
  sys.path.insert(0, ROOT)
  if variant != "base":
    for setting in variant.split("&"):
      name, value = setting.split("=", 1)
      module, attr = name.rsplit(".", 1)
      target = importlib.import_module(f"llama_jax.{module}")
      if not hasattr(target, attr):
        raise SystemExit(f"llama_jax.{module} has no {attr}")
      setattr(target, attr, ast.literal_eval(value))
  from llama_jax.bench.__main__ import main as bench_main
  sys.exit(bench_main(["train", *bench_args]))


def main() -> None:
  argv = sys.argv[1:]
  bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variants", default="base")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: run this variant
  args = parser.parse_args(own)
  if args.one is not None:
    run_variant(args.one, bench_args)
    return
  for round_ in range(args.rounds):
    for variant in args.variants.split(";"):
      done = subprocess.run([sys.executable, __file__, "--one", variant, "--", *bench_args],
                            capture_output=True, text=True, cwd=ROOT)
      lines = done.stdout.strip().splitlines()
      try:
        figures = json.loads(lines[-1])
      except (IndexError, json.JSONDecodeError):
        figures = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
      print(json.dumps({"variant": variant, "round": round_, **figures}), flush=True)


if __name__ == "__main__":
  main()
