"""The residual add and the RMSNorm that reads its sum, in one kernel:

  residual_norm(x, update, g)  ->  (x + update, RMSNorm(x + update) * g)

Between a decode step's matmuls, where XLA's GEMMs run the products (batches: `decode_block.
batch_blocks`), XLA compiles a residual add and the next block's or feed-forward's RMSNorm as two
or three kernels of 1.5-2 microseconds each on a few rows of activations, and a step is as much
those launches as it is the matmuls. One program a row: it adds, sums the squares, and writes the
sum and its normalised copy, in the model's arithmetic (`model.RMSNorm`: the sum rounded to the
compute dtype, float32 statistics, the normalised value rounded, then scaled in the compute dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

CHUNKS = (1024, 512, 256, 128, 64, 32)  # the features a loop step reads: the largest that divides D


def _chunk(d: int) -> int | None:
  return next((c for c in CHUNKS if d % c == 0), None)


def supported(d: int) -> bool:
  """Whether rows of `d` features split into whole chunks for the kernel."""
  return _chunk(d) is not None


def residual_norm(x: Array, update: Array, weight: Array, *, eps: float, interpret: bool | None = None,
                  name: str = "residual_norm") -> tuple[Array, Array]:
  """x, update (B, D) in the compute dtype; weight (D,). Returns (x + update, RMSNorm(x + update) *
  weight), both (B, D) in x's dtype."""
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
  rows, d = x.shape
  if update.shape != x.shape or weight.shape != (d,):
    raise ValueError(f"residual_norm takes x and update of one shape and a weight of its features; "
                     f"got {x.shape}, {update.shape}, {weight.shape}")
  chunk = _chunk(d)
  if chunk is None:
    raise ValueError(f"residual_norm needs features in chunks of a power of two >= {CHUNKS[-1]}; got {d}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  dtype, f32 = x.dtype, jnp.float32

  def kernel(x_ref, u_ref, w_ref, sum_ref, norm_ref):
    row = pl.program_id(0)

    def added(i):  # the residual sum over features i*chunk.., rounded as the model's add rounds it
      cols = pl.ds(i * chunk, chunk)
      return cols, (x_ref[row, cols].astype(f32) + u_ref[row, cols].astype(f32)).astype(dtype)

    def squares(i, total):
      cols, s = added(i)
      sum_ref[row, cols] = s
      s32 = s.astype(f32)
      return total + jnp.sum(s32 * s32)

    inverse_rms = jax.lax.rsqrt(jax.lax.fori_loop(0, d // chunk, squares, jnp.zeros((), f32)) / d + eps)

    def scale(i, carry):  # the sum made again from x and update (read back from L2), not from
      cols, s = added(i)  # sum_ref: another thread of the program wrote it, with no barrier between
      normed = (s.astype(f32) * inverse_rms).astype(dtype)
      norm_ref[row, cols] = (normed.astype(f32) * w_ref[cols].astype(f32)).astype(dtype)
      return carry

    jax.lax.fori_loop(0, d // chunk, scale, 0)

  return pl.pallas_call(
      kernel, grid=(rows,),
      out_shape=(jax.ShapeDtypeStruct((rows, d), dtype), jax.ShapeDtypeStruct((rows, d), dtype)),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret, name=name,
  )(x, update.astype(dtype), weight.astype(dtype))
