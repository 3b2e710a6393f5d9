"""The training kernels (`kernels.rms_norm`, `kernels.swiglu`) against XLA's fusions, each op's forward
and backward alone, beside the bytes they must move:

  python benchmarks/train_kernels.py [--tokens 16384] [--dim 2048] [--hidden 5632] [--reps 50]
                                     [--norm_rows 4] [--warps 4] [--swiglu_block 1024]

Comma lists sweep the kernels' settings (rms_norm.ROWS, both kernels' NUM_WARPS, swiglu.BLOCK): each
combination's kernel rows, after XLA's.

The TinyLlama step's shapes by default (8 x 2048 tokens, bf16). Per op and implementation, one JSON
line: the median time of a jitted forward-and-backward (outputs and input gradients for given
cotangents), the least bytes that op must read and write (each tensor once: the floor), the
bandwidth that implies and its share of the card's peak, and the largest difference from XLA's
results, relative to their largest value (a few bf16 units: XLA sums the norm weight's gradient in
bf16, the kernel in float32). The floors, in (tokens x width) tensors of bf16:

  norm       y = RMSNorm(x):          forward x -> y (2), backward x, dy -> dx (3)
  add_norm   s = x + h, y = RMSNorm(s): forward x, h -> s, y (4), backward s, ds, dy -> dx (4)
  swiglu     silu(gate) * up:         forward gate, up -> hidden (3), backward gate, up, d -> two (5)

(the norm's weight and per-position statistics are small and not counted). On a CPU the kernels
run in Pallas' interpreter: there it only checks that everything runs (the tests do, with tiny shapes).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama_jax.bench.common import median_call_us, peak_bandwidth  # noqa: E402
from llama_jax.kernels import matvec, rms_norm, swiglu  # noqa: E402

EPS = 1e-5


def ops(tokens: int, dim: int, hidden: int):
  """name -> (xla function, kernel function, inputs, cotangents, floor in bytes)."""
  keys = iter(jax.random.split(jax.random.key(0), 8))
  act = lambda width: jax.random.normal(next(keys), (tokens, width), jnp.float32).astype(jnp.bfloat16)  # noqa: E731
  x, h, ds, dy = act(dim), act(dim), act(dim), act(dim)
  w = 1 + 0.1 * jax.random.normal(next(keys), (dim,))
  gate, up, d = act(hidden), act(hidden), act(hidden)
  row, wide = tokens * dim * 2, tokens * hidden * 2

  def xla_add_norm(x, h, w):
    s = x + h
    return s, matvec.rms_norm(s, w, EPS)

  return {
      "norm": (lambda x, w: matvec.rms_norm(x, w, EPS), lambda x, w: rms_norm.rms_norm(x, w, EPS),
               (x, w), dy, 5 * row),
      "add_norm": (xla_add_norm, lambda x, h, w: rms_norm.rms_norm(x, w, EPS, residual=h),
                   (x, h, w), (ds, dy), 8 * row),
      "swiglu": (lambda g, u: jax.nn.silu(g) * u, swiglu.swiglu, (gate, up), d, 8 * wide),
  }


def forward_backward(fn, inputs, cotangents):
  out, vjp = jax.vjp(fn, *inputs)
  return out, vjp(cotangents)


def largest_difference(a, b) -> float:
  """Over the outputs and gradients: the largest difference, relative to the largest value of XLA's."""
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))
                   / jnp.maximum(jnp.max(jnp.abs(y.astype(jnp.float32))), 1e-30))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--hidden", type=int, default=5632)
  parser.add_argument("--reps", type=int, default=50)
  parser.add_argument("--norm_rows", default=str(rms_norm.ROWS))
  parser.add_argument("--warps", default=str(rms_norm.NUM_WARPS))
  parser.add_argument("--swiglu_block", default=str(swiglu.BLOCK))
  args = parser.parse_args()
  ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
  settings = [dict(rows=r, warps=w, block=b) for r in ints(args.norm_rows) for w in ints(args.warps)
              for b in ints(args.swiglu_block)]
  peak = peak_bandwidth(jax.devices()[0])
  for name, (xla_fn, kernel_fn, inputs, cotangents, floor) in ops(args.tokens, args.dim, args.hidden).items():
    xla = None
    for impl, setting in [("xla", {})] + [("pallas", s) for s in settings]:
      if setting:  # read when the kernels trace: a new jit below traces them again
        rms_norm.ROWS, swiglu.BLOCK = setting["rows"], setting["block"]
        rms_norm.NUM_WARPS = swiglu.NUM_WARPS = setting["warps"]
      step = jax.jit(functools.partial(forward_backward, xla_fn if impl == "xla" else kernel_fn))
      result = step(inputs, cotangents)
      us = median_call_us(step, inputs, cotangents, reps=args.reps)
      line = dict(op=name, impl=impl, **setting, tokens=args.tokens, us=round(us, 1),
                  floor_mb=round(floor / 1e6, 1), tb_per_s=round(floor / us / 1e6, 3))
      if peak:
        line["of_peak"] = round(floor / us / 1e6 / (peak / 1e12), 3)
      if impl == "xla":
        xla = result
      else:
        line["max_rel_diff_from_xla"] = largest_difference(result, xla)
      print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main()
