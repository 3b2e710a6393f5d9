"""The ragged decode-attention kernel against float32 attention at a server's shapes, on whatever
device runs it (compiled for a GPU; Pallas' interpreter on a CPU), beside XLA's bfloat16 attention
against the same reference (the error a bfloat16 engine already has).

  python benchmarks/decode_attention_check.py [--rows 64] [--kv_heads 4] [--heads 32] [--head_dim 64]

One JSON line per cache length: the largest absolute error of each over rows of random lengths.
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
from llama_jax.kernels import decode_attention as kernel  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=64)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--lengths", default="128,512,1024")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  for s in map(int, args.lengths.split(",")):
    b, n, kv, h = args.rows, args.heads, args.kv_heads, args.head_dim
    q = jnp.asarray(rng.normal(size=(b, 1, n, h)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(b, kv, s, h)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(b, kv, s, h)), jnp.bfloat16)
    lengths = jnp.asarray(rng.integers(1, s + 1, b))
    lengths = lengths.at[0].set(1).at[1].set(s)
    exact = kernel.reference(*(x.astype(jnp.float32) for x in (q, k, v)), lengths)
    ragged = jax.jit(kernel.ragged_decode_attention)(q, k, v, lengths)
    mask = M.attention_mask((lengths - 1)[:, None], jnp.broadcast_to(jnp.arange(s), (b, s)))
    xla = jax.jit(M.xla_attention, static_argnums=4)(q, k, v, mask, "BKSH")
    err = lambda x: float(jnp.max(jnp.abs(x.astype(jnp.float32) - exact)))  # noqa: E731
    print(json.dumps({"cache_len": s, "rows": b, "pallas_max_abs_err": round(err(ragged), 5),
                      "xla_bf16_max_abs_err": round(err(xla), 5),
                      "max_abs_exact": round(float(jnp.max(jnp.abs(exact))), 4),
                      "device": jax.devices()[0].device_kind}), flush=True)


if __name__ == "__main__":
  main()
