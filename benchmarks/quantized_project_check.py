"""The quantized matmul's error on this machine's backend (XLA's own kernels, and the fused
matrix-vector kernel where it applies), against float32 on the dequantized weight.

  python benchmarks/quantized_project_check.py

For each scheme (int8 per output channel, with zero points, in groups of 128; int4 in groups of
128) and layout (the checkpoint's input-major, the engine's output-major), at 1, 16 and 128 rows
(a decode step, a batch, a prefill), `projection.project` in bf16 on TinyLlama's wq|wk|wv shape
(2048 inputs, 2560 outputs), and at one row `kernels.matvec` on the output-major weight: the
largest error beside the product's size. One JSON line each. The CPU's tests check the same
arithmetic on the CPU backend; this is for a GPU's (its dots on converted integers).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from llama_jax import projection
from llama_jax.kernels import matvec
from llama_jax.quantize.grid import Grid
from llama_jax.quantize.rtn import quantize_weight

SCHEMES = {"int8": Grid(8), "int8_zeros": Grid(8, 0, False), "int8_g128": Grid(8, 128),
           "int4_g128": Grid(4, 128), "int4_g128_zeros": Grid(4, 128, False)}


def main() -> None:
  k, o = 2048, 2560
  w = jax.random.normal(jax.random.key(0), (k, o), jnp.float32) * 0.02
  for name, grid in SCHEMES.items():
    qt = quantize_weight(w, grid, 1, name="wqkv")
    exact = projection.dequantize(qt)  # (K, O) float32
    for layout, weight in (("input_major", qt), ("output_major", projection.transposed(qt))):
      for rows in (1, 16, 128):
        x = jax.random.normal(jax.random.key(rows), (rows, k), jnp.float32).astype(jnp.bfloat16)
        want = jnp.einsum("MK,KO->MO", x.astype(jnp.float32), exact, precision="highest")
        equation = "MK,OK->MO" if weight.output_major else "MK,KO->MO"
        got = jax.jit(lambda x, weight: projection.project(equation, x, weight, jnp.bfloat16, jnp.float32))(x, weight)
        row = {"scheme": name, "layout": layout, "rows": rows, "backend": jax.default_backend(),
               "xla_max_abs_err": float(jnp.max(jnp.abs(got - want))), "product_abs_max": float(jnp.max(jnp.abs(want)))}
        if rows == 1 and weight.output_major and matvec.supported(1, k, o, weight=matvec.Weight.of(weight)):
          fused = jax.jit(lambda x, weight: matvec.matvec(x, weight))(x, weight).astype(jnp.float32)
          row["matvec_max_abs_err"] = float(jnp.max(jnp.abs(fused - want)))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
