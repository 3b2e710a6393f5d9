"""Which products a batch decode step should run as `matvec` kernels (`kernels.decode_block.
BATCH_KERNELS`) rather than XLA's GEMMs, measured on one GPU in one process:

  python benchmarks/batch_kernels.py [--config configs/tinyllama_1b.py] [--batch_size 16]

`bench decode` (prompt 128 + 256 new tokens) with XLA's blocks, then with the fused attention kernel
and each set of products as kernels (none, each product alone, the two with a residual add, all
four). One JSON line each: the set, and the decode's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax.bench.decode import bench_decode  # noqa: E402
from llama_jax.kernels import decode_block  # noqa: E402
from llama_jax.train.cli import load_config  # noqa: E402

SETS = ((), ("wqkv_t",), ("wo_t",), ("w13_t",), ("w2_t",), ("wo_t", "w2_t"),
        ("wqkv_t", "wo_t", "w13_t", "w2_t"))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/tinyllama_1b.py")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--sets", default="", help="';'-separated comma lists (default: SETS)")
  args = p.parse_args()
  config = load_config(args.config)
  sets = [tuple(s.split(",")) if s else () for s in args.sets.split(";")] if args.sets else SETS
  committed = decode_block.BATCH_KERNELS
  for label, kernels, chosen in [("xla", "xla", ())] + [("kernels", "auto", s) for s in sets]:
    jax.clear_caches()  # the engine's programs are cached by config: rebuild them with this set
    decode_block.BATCH_KERNELS = frozenset(chosen)
    config.model.decode_kernels = kernels
    result = bench_decode(config, args.batch_size, 128, 256)
    print(json.dumps({"blocks": label, "batch_kernels": list(chosen), **result}), flush=True)
  decode_block.BATCH_KERNELS = committed


if __name__ == "__main__":
  main()
