"""RMSNorm for training as two Pallas kernels (Triton on GPUs): the forward in one pass over x, the
backward in one pass over x and the cotangent.

XLA runs a TinyLlama step's 45 norms, forward and autodiff's backward with the residual adds
around them, as six passes over the activations: 10.8 ms of a 220 ms step on an H200, where their
traffic needs about 3 (BENCHMARKS.md, session 15). The arithmetic is `matvec.rms_norm`'s (float32
statistics, the normalised value rounded to x's dtype, then scaled by the weight in that dtype), so
the forward gives XLA's values exactly; the backward is the float32 derivative of that function.

`model.norm_impl = "pallas"` uses it where `supported`; on a CPU the kernels run in Pallas'
interpreter (tests only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

ROWS = 4  # positions a program: 4 x 2048 float32 values a tensor stay in registers at 4 warps
NUM_WARPS = 4


def supported(positions: int, dim: int) -> bool:
  """Triton's blocks are powers of two: whole blocks of ROWS positions, a power-of-two width."""
  return positions % ROWS == 0 and dim & (dim - 1) == 0


def rms_norm(x: Array, weight: Array, eps: float, interpret: bool | None = None) -> Array:
  """x (..., D) normalised over D and scaled by `weight` (D,), in x's dtype; `supported` shapes."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  rows = x.reshape(-1, x.shape[-1])
  if not supported(*rows.shape):
    raise ValueError(f"rms_norm kernels take whole blocks of {ROWS} positions and a power-of-two "
                     f"width, got {x.shape}")
  return _rms_norm(rows, weight, float(eps), bool(interpret)).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm(x, weight, eps, interpret):
  return _forward(x, weight, eps, interpret)[0]


def _forward(x, weight, eps, interpret):
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
  n, d = x.shape

  def kernel(x_ref, w_ref, y_ref, inv_ref):
    x32 = x_ref[...].astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=1, keepdims=True) + eps)
    normed = (x32 * inv).astype(x_ref.dtype).astype(jnp.float32)
    # The weight arrives in x's dtype; a product of two such values is exact in float32, so rounding
    # it once gives what XLA's multiply in that dtype gives.
    y_ref[...] = (normed * w_ref[...].astype(jnp.float32)[None, :]).astype(y_ref.dtype)
    inv_ref[...] = inv[:, 0]

  y, inv = pl.pallas_call(
      kernel, grid=(n // ROWS,),
      in_specs=[pl.BlockSpec((ROWS, d), lambda i: (i, 0)), pl.BlockSpec((d,), lambda i: (0,))],
      out_specs=[pl.BlockSpec((ROWS, d), lambda i: (i, 0)), pl.BlockSpec((ROWS,), lambda i: (i,))],
      out_shape=[jax.ShapeDtypeStruct((n, d), x.dtype), jax.ShapeDtypeStruct((n,), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name="rms_norm_forward")(x, weight.astype(x.dtype))
  return y, inv


def _rms_norm_fwd(x, weight, eps, interpret):
  y, inv = _forward(x, weight, eps, interpret)
  return y, (x, weight, inv)


def _rms_norm_bwd(eps, interpret, residuals, dy):
  """y = n(x) w, n(x) = x r, r = (mean(x^2) + eps)^(-1/2): with g = dy w, dx = r (g - x r^2 mean(g x));
  dw = the sum over positions of dy n(x), each program's block summed here and the blocks by XLA."""
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
  del eps
  x, weight, inv = residuals
  n, d = x.shape

  def kernel(x_ref, dy_ref, w_ref, inv_ref, dx_ref, dw_ref):
    x32, dy32 = x_ref[...].astype(jnp.float32), dy_ref[...].astype(jnp.float32)
    r = inv_ref[...][:, None]
    normed = (x32 * r).astype(x_ref.dtype).astype(jnp.float32)  # what the forward scaled
    dw_ref[...] = jnp.sum(dy32 * normed, axis=0)[None, :]
    g = dy32 * w_ref[...].astype(jnp.float32)[None, :]
    mean_gx = jnp.mean(g * x32, axis=1, keepdims=True)
    dx_ref[...] = (r * (g - x32 * (r * r) * mean_gx)).astype(dx_ref.dtype)

  dx, dw_blocks = pl.pallas_call(
      kernel, grid=(n // ROWS,),
      in_specs=[pl.BlockSpec((ROWS, d), lambda i: (i, 0)), pl.BlockSpec((ROWS, d), lambda i: (i, 0)),
                pl.BlockSpec((d,), lambda i: (0,)), pl.BlockSpec((ROWS,), lambda i: (i,))],
      out_specs=[pl.BlockSpec((ROWS, d), lambda i: (i, 0)), pl.BlockSpec((1, d), lambda i: (i, 0))],
      out_shape=[jax.ShapeDtypeStruct((n, d), x.dtype), jax.ShapeDtypeStruct((n // ROWS, d), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name="rms_norm_backward")(x, dy.astype(x.dtype), weight.astype(x.dtype), inv)
  return dx, jnp.sum(dw_blocks, axis=0).astype(weight.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)
