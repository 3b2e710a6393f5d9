"""Which products a batch decode step should run as `matvec` kernels (`kernels.decode_block.
BATCH_KERNELS`) rather than XLA's GEMMs, measured on one GPU:

  python benchmarks/batch_kernels.py [--config configs/tinyllama_1b.py] [--batch_size 16] [--processes 2]

`bench decode` (prompt 128 + 256 new tokens) with XLA's blocks, then with the fused attention kernel
and each set of products as kernels (none, each product alone, the two with a residual add, all
four). Each run is a process of its own, and the list runs `--processes` times over: XLA autotunes
its GEMMs in every process, and its picks (so the step's time) differ from one process to the next
(batch 16 on XLA's blocks: 1.49 or 1.63 ms on H100s), while in one process every later run reuses
the first one's picks. One JSON line a run: the set, the round, and the decode's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax.bench.decode import bench_decode  # noqa: E402
from llama_jax.kernels import decode_block  # noqa: E402
from llama_jax.train.cli import load_config  # noqa: E402

SETS = ((), ("wqkv_t",), ("wo_t",), ("w13_t",), ("w2_t",), ("wo_t", "w2_t"),
        ("wqkv_t", "wo_t", "w13_t", "w2_t"))


def one(config_path: str, batch_size: int, kernels: str, chosen: tuple[str, ...]) -> dict:
  decode_block.BATCH_KERNELS = frozenset(chosen)
  config = load_config(config_path)
  config.model.decode_kernels = kernels
  return bench_decode(config, batch_size, 128, 256)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/tinyllama_1b.py")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--sets", default="", help="';'-separated comma lists (default: SETS)")
  p.add_argument("--processes", type=int, default=2, help="rounds over the list, a process a run")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: "xla" or a comma list
  args = p.parse_args()
  if args.one is not None:
    kernels, chosen = ("xla", ()) if args.one == "xla" else ("auto", tuple(filter(None, args.one.split(","))))
    print(json.dumps(one(args.config, args.batch_size, kernels, chosen)), flush=True)
    return
  sets = [tuple(s.split(",")) if s else () for s in args.sets.split(";")] if args.sets else SETS
  for round_ in range(args.processes):
    for label, chosen in [("xla", None)] + [("kernels", s) for s in sets]:
      child = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--batch_size",
               str(args.batch_size), "--one", "xla" if chosen is None else ",".join(chosen)]
      proc = subprocess.run(child, capture_output=True, text=True)
      lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
      result = json.loads(lines[-1]) if lines else {"error": proc.stderr[-500:]}
      print(json.dumps({"blocks": label, "batch_kernels": list(chosen or ()), "round": round_, **result}),
            flush=True)


if __name__ == "__main__":
  main()
