"""Formulations of the weight-only quantized matmul at decode's shapes, timed against bf16.

  python benchmarks/quantized_matmul.py [--rows 1,16] [--steps 50]

Also the same weights stored transposed, (out, in) (`*_transposed`): a one-row product is then a
row reduction over contiguous inputs, where (in, out) makes it a column reduction. A decode step of
the TinyLlama-1.1B shape without attention: 22 layers of x @ wqkv (2048 x 2560),
@ wo (2048 x 2048), @ w13 (2048 x 11264), @ w2 (5632 x 2048), `steps` times inside one jitted
`fori_loop` (the weights are loop-invariant there, as in the engine's decode loop: a formulation
whose dequantization XLA hoists out of the loop shows as a peak memory of the bf16 weights).
Prints one JSON line per (formulation, rows): ms per step, GB/s of the weights' bytes, peak memory.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import projection
from llama_jax.quantize.grid import Grid
from llama_jax.quantize.rtn import quantize_weight

SHAPES = {"wqkv": (2048, 2560), "wo": (2048, 2048), "w13": (2048, 11264), "w2": (5632, 2048)}
LAYERS = 22


def layer_step(x, layer, matmul):
  a = matmul(x, layer["wqkv"])[:, :2048]
  x = x + matmul(a.astype(x.dtype), layer["wo"]).astype(x.dtype)
  b = matmul(x, layer["w13"])
  h = (jax.nn.silu(b[:, :5632]) * b[:, 5632:]).astype(x.dtype)
  x = x + matmul(h, layer["w2"]).astype(x.dtype)
  return (x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-6)).astype(x.dtype)


def make_weights(kind: str, n_layers: int, seed: int = 0):
  layers = []
  for i in range(n_layers):
    layer = {}
    for j, (name, shape) in enumerate(SHAPES.items()):
      w = jax.random.normal(jax.random.key(seed * 1000 + i * 10 + j), shape, jnp.float32) * 0.02
      if kind == "bf16":
        layer[name] = w.astype(jnp.bfloat16)
      elif kind == "bf16_t":  # (out, in): each output a dot over contiguous inputs
        layer[name] = w.T.astype(jnp.bfloat16)
      elif kind == "int8_t":  # int8 per output channel, stored (out, in), scales (out,)
        scale = jnp.max(jnp.abs(w), axis=0) / 127
        layer[name] = (jnp.round(w / scale).astype(jnp.int8).T, scale.astype(jnp.float16))
      else:
        grid = Grid(8, 0) if kind == "int8" else Grid(4, 128)
        layer[name] = jax.jit(lambda w: quantize_weight(w, grid, 1, name=name))(w)
    layers.append(layer)
  return layers


# --- formulations: (x (M, K) bf16, weight) -> (M, O) float32

def plain(x, w):
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def current(x, qt):
  return projection._quantized_matmul(x, qt, jnp.bfloat16)


def current_no_after(x, qt):
  m, gs = x.shape[0], qt.group_size
  xg = x.reshape(m, qt.n_groups, gs)
  ints = projection.signed_groups(qt, jnp.bfloat16)
  width = gs // len(ints)
  partial = sum(jnp.einsum("MGC,GCO->MGO", xg[..., i * width:(i + 1) * width], q,
                           preferred_element_type=jnp.float32) for i, q in enumerate(ints))
  return jnp.einsum("MGO,GO->MO", partial, qt.scales.astype(jnp.float32))


def multiply_reduce(x, qt, after=True):
  """One elementwise product summed over the inputs: XLA fuses the integer unpacking into the
  reduction, which reads the integers once."""
  m, gs = x.shape[0], qt.group_size
  ints = projection.signed_groups(qt, jnp.float32, after=x if after else None)  # [(G, C', O)]
  width = gs // len(ints)
  xg = x.astype(jnp.float32).reshape(m, qt.n_groups, gs)
  total = 0
  for i, q in enumerate(ints):
    xs = xg[..., i * width:(i + 1) * width]  # (M, G, C')
    total = total + jnp.sum(xs[:, :, :, None] * q[None] * qt.scales.astype(jnp.float32)[None, :, None, :],
                            axis=(1, 2))
  return total


def dequantize_then_dot(x, qt):
  w = projection.dequantize(qt, jnp.bfloat16, after=x).reshape(qt.in_features, qt.out_features)
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def transposed(x, w):
  return jnp.einsum("MK,OK->MO", x, w, preferred_element_type=jnp.float32)


def transposed_swapped(x, w):
  """The same product with the operands swapped, (O, K) @ (K, M), and the small result transposed:
  the GEMM's long side is the weight's outputs, as a library's skinny-matrix kernels expect."""
  return jnp.einsum("OK,MK->OM", w, x, preferred_element_type=jnp.float32).T


def int8_transposed(x, w):
  """Integers (out, in) converted in the dot's operand, the per-channel scale applied after."""
  q, scale = w
  y = jnp.einsum("MK,OK->MO", x, q.astype(x.dtype), preferred_element_type=jnp.float32)
  return y * scale.astype(jnp.float32)


FORMULATIONS = {
    "bf16": ("bf16", plain),
    "bf16_transposed": ("bf16_t", transposed),
    "bf16_transposed_swapped": ("bf16_t", transposed_swapped),
    "int8_transposed": ("int8_t", int8_transposed),
    "int8_current": ("int8", current),
    "int8_no_after": ("int8", current_no_after),
    "int8_multiply_reduce": ("int8", multiply_reduce),
    "int8_multiply_reduce_no_after": ("int8", lambda x, q: multiply_reduce(x, q, after=False)),
    "int8_dequantize_dot": ("int8", dequantize_then_dot),
    "int4_current": ("int4", current),
    "int4_no_after": ("int4", current_no_after),
    "int4_multiply_reduce": ("int4", multiply_reduce),
    "int4_dequantize_dot": ("int4", dequantize_then_dot),
}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rows", default="1,16")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--layers", type=int, default=LAYERS)
  p.add_argument("--only", default="", help="comma-separated formulation names")
  args = p.parse_args()
  kinds = {FORMULATIONS[n][0] for n in (args.only.split(",") if args.only else FORMULATIONS)}
  weights = {k: make_weights(k, args.layers) for k in sorted(kinds)}
  names = args.only.split(",") if args.only else list(FORMULATIONS)
  for rows in map(int, args.rows.split(",")):
    x0 = jax.random.normal(jax.random.key(1), (rows, 2048), jnp.float32).astype(jnp.bfloat16)
    for name in names:
      kind, matmul = FORMULATIONS[name]
      ws = weights[kind]

      @jax.jit
      def run(x, ws):
        def body(_, x):
          for layer in ws:
            x = layer_step(x, layer, matmul)
          return x
        return jax.lax.fori_loop(0, args.steps, body, x)

      try:
        out = jax.block_until_ready(run(x0, ws))
        times = []
        for _ in range(5):
          t = time.perf_counter()
          out = jax.block_until_ready(run(x0, ws))
          times.append(time.perf_counter() - t)
        ms = 1000 * float(np.median(times)) / args.steps
        nbytes = projection.nbytes(ws)
        stats = jax.devices()[0].memory_stats() or {}
        print(json.dumps({"formulation": name, "rows": rows, "ms_per_step": round(ms, 4),
                          "weights_gb": round(nbytes / 1e9, 3), "gb_per_s": round(nbytes / ms / 1e6, 1),
                          "finite": bool(jnp.all(jnp.isfinite(out))),
                          "peak_mem_gb": round(stats.get("peak_bytes_in_use", 0) / 1e9, 2)}), flush=True)
      except Exception as e:  # noqa: BLE001 - one formulation failing must not hide the others
        print(json.dumps({"formulation": name, "rows": rows, "error": str(e)[:300]}), flush=True)


if __name__ == "__main__":
  main()
