"""RMSNorm for training as Pallas kernels (Triton on GPUs): the forward in one pass over x, the
backward in one pass over x and the cotangent; with `residual`, the residual add before it in the
same passes (s = x + residual, then the norm of s; the backward adds s's own cotangent).

XLA runs a TinyLlama step's 45 norms, forward and autodiff's backward with the residual adds
around them, as six passes over the activations: 10.8 ms of a 220 ms step on an H200, where their
traffic needs about 3 (BENCHMARKS.md, session 15). The arithmetic is `matvec.rms_norm`'s (float32
statistics, the normalised value rounded to x's dtype, then scaled by the weight in that dtype), so
the forward gives XLA's values exactly (with the add: the norm of the float32 sum, as XLA's fusion of
the two computes it); the backward is the float32 derivative of that function (with the add,
evaluated at the sum as stored, rounded: within a unit of x's dtype of the exact point).

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


def rms_norm(x: Array, weight: Array, eps: float, residual: Array | None = None,
             interpret: bool | None = None) -> Array | tuple[Array, Array]:
  """x (..., D) normalised over D and scaled by `weight` (D,), in x's dtype; `supported` shapes.
  With `residual` (x's shape): (s, norm of s) for s = x + residual, in x's dtype."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  shape = x.shape
  rows = x.reshape(-1, shape[-1])
  if not supported(*rows.shape):
    raise ValueError(f"rms_norm kernels take whole blocks of {ROWS} positions and a power-of-two "
                     f"width, got {shape}")
  if residual is None:
    return _norm(rows, weight, float(eps), bool(interpret)).reshape(shape)
  if residual.shape != shape:
    raise ValueError(f"residual {residual.shape} is not x's shape {shape}")
  s, y = _add_norm(rows, residual.reshape(rows.shape).astype(x.dtype), weight, float(eps), bool(interpret))
  return s.reshape(shape), y.reshape(shape)


def _call(kernel, name, n, d, operands, outputs, interpret):
  """One program a block of ROWS positions. Operands and outputs are (array, kind) pairs, the kind
  saying how a program sees it (shapes alone cannot: n may equal d): "rows" (n, d) by rows,
  "weight" (d,) whole, "stats" (n,) by rows, "partial" (n // ROWS, d) a row a program."""
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
  specs = {"rows": pl.BlockSpec((ROWS, d), lambda i: (i, 0)), "weight": pl.BlockSpec((d,), lambda i: (0,)),
           "stats": pl.BlockSpec((ROWS,), lambda i: (i,)), "partial": pl.BlockSpec((1, d), lambda i: (i, 0))}
  return pl.pallas_call(
      kernel, grid=(n // ROWS,), in_specs=[specs[kind] for _, kind in operands],
      out_specs=[specs[kind] for _, kind in outputs], out_shape=[shape for shape, _ in outputs],
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name=name)(*(array for array, _ in operands))


def _normalise(s32, w_ref, dtype, eps):
  """(y in float32, 1/rms (ROWS, 1)) of a block: `matvec.rms_norm`'s roundings. The weight arrives
  in x's dtype; a product of two such values is exact in float32, so rounding it once gives what
  XLA's multiply in that dtype gives."""
  inv = jax.lax.rsqrt(jnp.mean(s32 * s32, axis=1, keepdims=True) + eps)
  normed = (s32 * inv).astype(dtype).astype(jnp.float32)
  return normed * w_ref[...].astype(jnp.float32)[None, :], inv


def _gradients(s32, dy32, w_ref, inv, dtype):
  """(d s, this block's share of d w) for y = n(s) w, n(s) = s r, r = (mean(s^2) + eps)^(-1/2):
  with g = dy w, ds = r (g - s r^2 mean(g s)); dw sums dy n(s) over the positions."""
  normed = (s32 * inv).astype(dtype).astype(jnp.float32)  # what the forward scaled
  g = dy32 * w_ref[...].astype(jnp.float32)[None, :]
  mean_gs = jnp.mean(g * s32, axis=1, keepdims=True)
  return inv * (g - s32 * (inv * inv) * mean_gs), jnp.sum(dy32 * normed, axis=0)[None, :]


def _forward(x, weight, eps, interpret):
  n, d = x.shape

  def kernel(x_ref, w_ref, y_ref, inv_ref):
    y, inv = _normalise(x_ref[...].astype(jnp.float32), w_ref, x_ref.dtype, eps)
    y_ref[...] = y.astype(y_ref.dtype)
    inv_ref[...] = inv[:, 0]

  return _call(kernel, "rms_norm_forward", n, d, [(x, "rows"), (weight.astype(x.dtype), "weight")],
               [(jax.ShapeDtypeStruct((n, d), x.dtype), "rows"), (jax.ShapeDtypeStruct((n,), jnp.float32), "stats")],
               interpret)


def _backward(s, dy, ds, weight, inv, interpret):
  """(d s + `ds` where given, d weight)."""
  n, d = s.shape

  def kernel(*refs):
    s_ref, dy_ref, *ds_ref, w_ref, inv_ref, dx_ref, dw_ref = refs
    s32 = s_ref[...].astype(jnp.float32)
    dx, dw = _gradients(s32, dy_ref[...].astype(jnp.float32), w_ref, inv_ref[...][:, None], s_ref.dtype)
    dw_ref[...] = dw
    if ds_ref:  # the residual stream's own cotangent, added in the same pass
      dx = dx + ds_ref[0][...].astype(jnp.float32)
    dx_ref[...] = dx.astype(dx_ref.dtype)

  operands = [(s, "rows"), (dy.astype(s.dtype), "rows")] + ([] if ds is None else [(ds.astype(s.dtype), "rows")])
  dx, dw_blocks = _call(kernel, "rms_norm_backward", n, d,
                        operands + [(weight.astype(s.dtype), "weight"), (inv, "stats")],
                        [(jax.ShapeDtypeStruct((n, d), s.dtype), "rows"),
                         (jax.ShapeDtypeStruct((n // ROWS, d), jnp.float32), "partial")], interpret)
  return dx, jnp.sum(dw_blocks, axis=0).astype(weight.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _norm(x, weight, eps, interpret):
  return _forward(x, weight, eps, interpret)[0]


def _norm_fwd(x, weight, eps, interpret):
  y, inv = _forward(x, weight, eps, interpret)
  return y, (x, weight, inv)


def _norm_bwd(eps, interpret, residuals, dy):
  del eps
  x, weight, inv = residuals
  return _backward(x, dy, None, weight, inv, interpret)


_norm.defvjp(_norm_fwd, _norm_bwd)


def _add_forward(x, residual, weight, eps, interpret):
  n, d = x.shape

  def kernel(x_ref, r_ref, w_ref, s_ref, y_ref, inv_ref):
    # The norm of the float32 sum, as XLA's fusion of the add into the norm computes it (its "excess
    # precision"); the sum itself is stored rounded to x's dtype, as XLA stores it.
    s32 = x_ref[...].astype(jnp.float32) + r_ref[...].astype(jnp.float32)
    s_ref[...] = s32.astype(s_ref.dtype)
    y, inv = _normalise(s32, w_ref, x_ref.dtype, eps)
    y_ref[...] = y.astype(y_ref.dtype)
    inv_ref[...] = inv[:, 0]

  return _call(kernel, "add_rms_norm_forward", n, d,
               [(x, "rows"), (residual, "rows"), (weight.astype(x.dtype), "weight")],
               [(jax.ShapeDtypeStruct((n, d), x.dtype), "rows")] * 2
               + [(jax.ShapeDtypeStruct((n,), jnp.float32), "stats")], interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _add_norm(x, residual, weight, eps, interpret):
  return _add_forward(x, residual, weight, eps, interpret)[:2]


def _add_norm_fwd(x, residual, weight, eps, interpret):
  s, y, inv = _add_forward(x, residual, weight, eps, interpret)
  return (s, y), (s, weight, inv)


def _add_norm_bwd(eps, interpret, residuals, cotangents):
  del eps
  s, weight, inv = residuals
  ds, dy = cotangents
  d, dweight = _backward(s, dy, ds, weight, inv, interpret)
  return d, d, dweight  # s = x + residual: both get s's whole cotangent


_add_norm.defvjp(_add_norm_fwd, _add_norm_bwd)
