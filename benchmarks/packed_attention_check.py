"""Prefill attention over prompts packed side by side (a segment mask) against float32 attention,
on whatever device runs it: cuDNN flash attention with the mask where the device has it (an NVIDIA
GPU), and XLA's bfloat16 attention against the same reference (the error a bfloat16 engine already
has). A wrong mask (a query seeing another prompt's keys, or its own future) is an error of the
size of the values, ~1; bfloat16 rounding is ~0.01.

  python benchmarks/packed_attention_check.py [--rows 4] [--lengths 256,1024]

One JSON line per row length: each implementation's largest absolute error over rows of random
prompt lengths, packed with a tail of padding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax import model as M  # noqa: E402


def packed_rows(rng, rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(positions, segments) (rows, length) of random prompts packed into each row; padding -1."""
  positions, segments = np.zeros((rows, length), np.int32), np.full((rows, length), -1, np.int32)
  for r in range(rows):
    at, segment = 0, 0
    while at < length - 8:
      n = int(rng.integers(1, length // 3))
      n = min(n, length - 8 - at)
      positions[r, at:at + n], segments[r, at:at + n] = np.arange(n), segment
      at, segment = at + n, segment + 1
    positions[r, at:] = np.arange(length - at)
  return positions, segments


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=4)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--lengths", default="256,1024")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  for length in map(int, args.lengths.split(",")):
    b, n, kv, h = args.rows, args.heads, args.kv_heads, args.head_dim
    q, k, v = (jnp.asarray(rng.normal(size=(b, length, heads, h)), jnp.bfloat16) for heads in (n, kv, kv))
    positions, segments = packed_rows(rng, b, length)
    mask = M.attention_mask(jnp.asarray(positions), jnp.asarray(positions), jnp.asarray(segments),
                            jnp.asarray(segments))
    f32 = lambda a: a.astype(jnp.float32)
    reference = np.asarray(jax.jit(M.xla_attention)(f32(q), f32(k), f32(v), mask))
    row = {"rows": b, "length": length, "prompts": int((segments.max(axis=1) + 1).sum()),
           "device": jax.devices()[0].device_kind}
    impls = {"xla_bf16": M.xla_attention}
    if jax.default_backend() == "gpu":
      impls["cudnn_bf16"] = M.cudnn_attention
    for name, fn in impls.items():
      out = np.asarray(jax.jit(fn)(q, k, v, mask).astype(jnp.float32))
      row[f"{name}_max_error"] = round(float(np.abs(out - reference).max()), 5)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
