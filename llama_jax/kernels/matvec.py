"""Matrix-vector products of a decode step, with the work around them in the same kernel.

A one-token decode step is bound by reading the weights, and at batch 1 every projection is a
matrix-vector product that a GPU reads faster the fewer and the larger its kernels are: XLA runs a
block as ~22 kernels, of which ~15 are 1-2 microsecond ones (RMSNorm's reduction and scale, the
SwiGLU product, the residual adds) between the products. Here a projection is one Pallas (Triton)
kernel that also does what precedes and follows it:

  matvec(x, w, norm=g)           RMSNorm(x) * g, then @ w        (the attention and feed-forward inputs)
  matvec(x, w, residual=r)       x @ w + r                       (wo and w2, with the residual stream)
  matvec(x, w, norm=g, gate_up=True)
                                 silu(a) * b, where a | b = RMSNorm(x) * g @ w   (w1 | w3)

`w` is output-major, (N, D) for N outputs of D inputs (the layout of PyTorch's Linear): each
program reads `block_n` whole rows of it, contiguous, in chunks of `block_k`, and writes `block_n`
outputs; the rows of x are few (a decode batch), so each program recomputes the RMSNorm statistics
of all of them (a read of B x D values beside the block_n x D of weights). Arithmetic follows the
model's (`model.RMSNorm`, `FeedForward`, `Block`): float32 statistics, the normed input and the
products' outputs rounded to the input dtype before the next operation, float32 accumulation.

On a CPU the kernels run in Pallas' interpreter (tests only: slow, and checked against `reference`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

BLOCK_N = 16  # output rows a program makes (Triton's dot takes >= 16)
BLOCK_K = 256  # inputs a program reads per step of its loop
MAX_ROWS = 64  # batch rows one kernel takes (more: a matrix product, which XLA's GEMMs do well)


def supported(rows: int, d: int, n: int, gate_up: bool = False, block_n: int = BLOCK_N,
              block_k: int = BLOCK_K) -> bool:
  """Whether x (rows, d) @ w (n, d) runs as one kernel: whole blocks of outputs and of inputs."""
  outputs = n // 2 if gate_up else n
  return (0 < rows <= MAX_ROWS and d % block_k == 0 and outputs % block_n == 0
          and (not gate_up or n % 2 == 0))


def _padded_rows(rows: int) -> int:
  return max(16, 1 << (rows - 1).bit_length())


def _dot_t(a: Array, b: Array) -> Array:
  """a @ b.T accumulated in float32 (Triton's dot: >= 16 rows and columns)."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(*refs, rows: int, d: int, outputs: int, eps: float, has_norm: bool, has_residual: bool,
            gate_up: bool, block_n: int, block_k: int, reduce: bool):
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
  refs = list(refs)
  x_ref, w_ref = refs.pop(0), refs.pop(0)
  g_ref = refs.pop(0) if has_norm else None
  r_ref = refs.pop(0) if has_residual else None
  (o_ref,) = refs
  j = pl.program_id(0)
  steps = d // block_k
  padded = 1 if reduce else _padded_rows(rows)
  row_ids = jnp.arange(padded)
  live = (row_ids < rows)[:, None]

  def x_block(k):  # (padded, BLOCK_K) in x's dtype; rows past the batch read as zeros
    return plgpu.load(x_ref.at[pl.ds(0, padded), pl.ds(k * block_k, block_k)], mask=live, other=0)

  if has_norm:
    def sum_squares(k, acc):
      xk = x_block(k).astype(jnp.float32)
      return acc + jnp.sum(xk * xk, axis=1)
    mean_square = jax.lax.fori_loop(0, steps, sum_squares, jnp.zeros((padded,), jnp.float32)) / d
    inverse_rms = jax.lax.rsqrt(mean_square + eps)[:, None]

  def w_block(first_row, k):
    return plgpu.load(w_ref.at[pl.ds(first_row, block_n), pl.ds(k * block_k, block_k)],
                      eviction_policy="evict_first")

  def product(xk, w):  # (padded, block_k) x (block_n, block_k) -> (padded, block_n) float32
    if reduce:  # one row: a multiply and a sum over the inputs, no tensor-core tile to fill
      return jnp.sum(xk.astype(jnp.float32) * w.astype(jnp.float32), axis=1)[None, :]
    return _dot_t(xk, w)

  def body(k, accs):
    xk = x_block(k)
    if has_norm:
      scale = g_ref[pl.ds(k * block_k, block_k)]
      xk = (xk.astype(jnp.float32) * inverse_rms).astype(x_ref.dtype) * scale[None, :]
    heads = (j * block_n, outputs + j * block_n) if gate_up else (j * block_n,)
    return tuple(acc + product(xk, w_block(first, k)) for acc, first in zip(accs, heads))

  zeros = jnp.zeros((padded, block_n), jnp.float32)
  accs = jax.lax.fori_loop(0, steps, body, (zeros, zeros) if gate_up else (zeros,))
  out = accs[0].astype(o_ref.dtype)
  if gate_up:
    gate = out.astype(jnp.float32)
    silu = (gate / (1.0 + jnp.exp(-gate))).astype(o_ref.dtype)
    out = silu * accs[1].astype(o_ref.dtype)
  cols = pl.ds(j * block_n, block_n)
  if has_residual:
    out = out + plgpu.load(r_ref.at[pl.ds(0, padded), cols], mask=live, other=0)
  plgpu.store(o_ref.at[pl.ds(0, padded), cols], out.astype(o_ref.dtype), mask=live)


def matvec(x: Array, w: Array, *, norm: Array | None = None, eps: float = 1e-5,
           residual: Array | None = None, gate_up: bool = False, block_n: int = BLOCK_N,
           block_k: int = BLOCK_K, num_warps: int = 4, num_stages: int = 3, reduce: bool | None = None,
           interpret: bool | None = None, name: str = "matvec") -> Array:
  """x (B, D) @ w.T for an output-major w (N, D): (B, N) in x's dtype, or (B, N/2) with
  `gate_up`. `norm` (D,): x is RMSNorm'ed (float32 statistics, `eps`) and scaled by it first;
  `residual` (B, N): added to the product; `gate_up`: w is w1 over w3 ((2F, D)) and the result is
  silu(x @ w1.T) * (x @ w3.T), SwiGLU's hidden layer. `reduce` (default: for one row) multiplies
  and sums where a batch runs Triton's dot on rows padded to 16."""
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
  rows, d = x.shape
  n = w.shape[0]
  if w.shape[1] != d:
    raise ValueError(f"w {w.shape} is not output-major for x {x.shape}: want (N, {d})")
  if not supported(rows, d, n, gate_up, block_n, block_k):
    raise ValueError(f"matvec takes 1..{MAX_ROWS} rows, D a multiple of {block_k} and outputs a "
                     f"multiple of {block_n}; got x {x.shape}, w {w.shape}, gate_up={gate_up}")
  reduce = rows == 1 if reduce is None else reduce
  if reduce and rows != 1:
    raise ValueError(f"reduce takes one row, got {rows}")
  outputs = n // 2 if gate_up else n
  if residual is not None and residual.shape != (rows, outputs):
    raise ValueError(f"residual {residual.shape} is not the output's shape {(rows, outputs)}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  operands = [x, w.astype(x.dtype)]
  if norm is not None:
    operands.append(norm.astype(x.dtype))
  if residual is not None:
    operands.append(residual.astype(x.dtype))
  kernel = functools.partial(_kernel, rows=rows, d=d, outputs=outputs, eps=eps,
                             has_norm=norm is not None, has_residual=residual is not None,
                             gate_up=gate_up, block_n=block_n, block_k=block_k, reduce=reduce)
  return pl.pallas_call(
      kernel, grid=(outputs // block_n,),
      out_shape=jax.ShapeDtypeStruct((rows, outputs), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=name)(*operands)


def reference(x: Array, w: Array, *, norm: Array | None = None, eps: float = 1e-5,
              residual: Array | None = None, gate_up: bool = False) -> Array:
  """The same in plain XLA, as the model computes it."""
  if norm is not None:
    x32 = x.astype(jnp.float32)
    x = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    x = x * norm.astype(x.dtype)
  out = jnp.einsum("BD,ND->BN", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
  out = out.astype(x.dtype)
  if gate_up:
    gate, up = jnp.split(out, 2, axis=-1)
    out = jax.nn.silu(gate) * up
  if residual is not None:
    out = out + residual.astype(x.dtype)
  return out
