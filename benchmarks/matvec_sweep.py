"""The fused matrix-vector kernel (`llama_jax.kernels.matvec`) by tile and launch settings, on one GPU.

  python benchmarks/matvec_sweep.py [--rows 1,16] [--dim 2048 --hidden 5632 --heads 32 --kv_heads 4]

For each of a decode block's four products (TinyLlama-1.1B's shapes by default) and each setting
(block_n output rows and block_k inputs a program step, warps, pipeline stages, and for one row the
multiply-and-sum form against Triton's dot on rows padded to 16): `layers` copies of the weight (so
that they do not sit in L2) run one after another in one program, three times, under the profiler;
the kernel's own device time (mean, from the trace) and the bandwidth it reaches on the weight's
bytes. One JSON line per setting, then the best per product.
"""

from __future__ import annotations

import argparse
import collections
import glob
import itertools
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax.kernels import matvec  # noqa: E402


def kernel_times(trace_dir: str) -> dict[str, list[int]]:
  from jax.profiler import ProfileData
  path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
  times = collections.defaultdict(list)
  for plane in ProfileData.from_file(path).planes:
    if not re.match(r"/device:GPU:0$", plane.name):
      continue
    for line in plane.lines:
      if any(s in line.name.lower() for s in ("xla ops", "module", "step")):
        continue
      for ev in line.events:
        times[re.sub(r"__\d+$", "", ev.name)].append(ev.duration_ns)
  return times


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", default="1,16")
  p.add_argument("--dim", type=int, default=2048)
  p.add_argument("--hidden", type=int, default=5632)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--layers", type=int, default=22)
  p.add_argument("--block_n", default="16,32")
  p.add_argument("--block_k", default="256,512,1024")
  p.add_argument("--warps", default="4,8")
  p.add_argument("--stages", default="2,4")
  args = p.parse_args()
  d, f, h = args.dim, args.hidden, args.dim // args.heads
  products = {"wqkv_t": ((args.heads + 2 * args.kv_heads) * h, d, dict(norm=True)),
              "wo_t": (d, args.heads * h, dict(residual=True)),
              "w13_t": (2 * f, d, dict(norm=True, gate_up=True)),
              "w2_t": (d, f, dict(residual=True))}
  ints = lambda s: [int(v) for v in s.split(",")]
  for rows in ints(args.rows):
    for name, (outputs, inputs, opts) in products.items():
      key = jax.random.key(outputs + inputs)
      ws = [jax.random.normal(jax.random.fold_in(key, i), (outputs, inputs), jnp.bfloat16) * 0.02
            for i in range(args.layers)]
      x = jax.random.normal(key, (rows, inputs), jnp.bfloat16)
      width = outputs // 2 if opts.get("gate_up") else outputs
      kw = dict(norm=jnp.ones((inputs,), jnp.bfloat16) if opts.get("norm") else None,
                residual=jnp.ones((rows, width), jnp.bfloat16) if opts.get("residual") else None,
                gate_up=bool(opts.get("gate_up")))
      settings = {}
      for bn, bk, warps, stages, reduce in itertools.product(
          ints(args.block_n), ints(args.block_k), ints(args.warps), ints(args.stages),
          (True, False) if rows == 1 else (False,)):
        if not matvec.supported(rows, inputs, outputs, kw["gate_up"], bn, bk):
          continue
        tag = f"mv_{bn}_{bk}_{warps}_{stages}_{int(reduce)}"
        fn = jax.jit(lambda x, ws, bn=bn, bk=bk, warps=warps, stages=stages, reduce=reduce, tag=tag: [
            matvec.matvec(x, w, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                          reduce=reduce, name=tag, **kw) for w in ws])
        try:
          jax.block_until_ready(fn(x, ws))
        except Exception as e:  # a setting Triton cannot compile (registers, shared memory)
          print(json.dumps({"product": name, "rows": rows, "setting": tag, "error": str(e)[:200]}), flush=True)
          continue
        settings[tag] = fn
      with tempfile.TemporaryDirectory() as trace:
        with jax.profiler.trace(trace):
          for fn in settings.values():
            for _ in range(3):
              jax.block_until_ready(fn(x, ws))
        times = kernel_times(trace)
      best = None
      for tag in settings:
        ns = times.get(tag)
        if not ns:
          continue
        us = sum(ns) / len(ns) / 1e3
        row = {"product": name, "rows": rows, "shape": [outputs, inputs], "setting": tag,
               "us": round(us, 2), "tb_per_s": round(outputs * inputs * 2 / us / 1e6, 3), "kernels": len(ns)}
        print(json.dumps(row), flush=True)
        best = row if best is None or row["us"] < best["us"] else best
      print(json.dumps({"best": best}), flush=True)


if __name__ == "__main__":
  main()
