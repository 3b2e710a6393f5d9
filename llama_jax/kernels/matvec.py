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
program reads `block_n` whole rows of it, contiguous, in steps of `block_k` inputs, and writes
`block_n` outputs; the rows of x are few (a decode batch), and each program reads all of them.
RMSNorm is folded into the product: RMSNorm(x) * g @ w = ((x * g) @ w) / rms(x), so the statistics
(float32) gather in the same pass over x as the product instead of a pass of their own before it.
The roundings differ from the model's (`model.RMSNorm` rounds the normed x to the compute dtype,
then scales it) at the compute dtype's precision; products accumulate in float32 and are rounded
to the compute dtype before SwiGLU and before the residual add, as the model's are.

On a CPU the kernels run in Pallas' interpreter (tests only: slow, and checked against `reference`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_jax.kernels import tiles

Array = jax.Array

MAX_ROWS = 16  # batch rows a kernel takes (Triton's dot on rows padded to 16)


class Settings(NamedTuple):
  """A kernel's tiling and launch: outputs (rows of w) per program, inputs per step of its loop,
  warps, Triton's pipeline stages, and the one-row multiply-and-sum form (`reduce`) or Triton's dot
  on rows padded to 16."""
  block_n: int
  block_k: int
  num_warps: int
  num_stages: int
  reduce: bool


def settings(rows: int, d: int) -> Settings | None:
  """The settings measured fastest for a decode block's products (`benchmarks/kernel_sweep.py`,
  TinyLlama's shapes, one row, H100): the multiply-and-sum over 4 outputs a program (640 programs
  for wq|wk|wv: more loads in flight than 160 programs of 16) with the longest input step that
  divides d, eight warps (wq|wk|wv 6.0 us, wo 4.7, w1|w3 19.1, w2 12.2; 1.164 ms a decode step
  against 1.183 with 16 outputs a program). A batch: Triton's dot over 16 outputs and 256 inputs.
  None if d is not a multiple of 256."""
  if rows == 1:
    block_k = next((k for k in (1024, 512) if d % k == 0), None)
    if block_k:
      return Settings(4, block_k, 8, 4, True)
  return Settings(16, 256, 4, 4, False) if d % 256 == 0 else None


def supported(rows: int, d: int, n: int, gate_up: bool = False, chosen: Settings | None = None) -> bool:
  """Whether x (rows, d) @ w (n, d) runs as one kernel (with `chosen` settings, else the default
  ones): whole blocks of outputs and of inputs."""
  if not 0 < rows <= MAX_ROWS or (gate_up and n % 2):
    return False
  chosen = chosen or settings(rows, d)
  outputs = n // 2 if gate_up else n
  return chosen is not None and d % chosen.block_k == 0 and outputs % chosen.block_n == 0


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
  padded = 1 if reduce else tiles.dot_rows(rows)
  row_ids = jnp.arange(padded)
  live = (row_ids < rows)[:, None]

  cols = pl.ds(j * block_n, block_n)
  if has_residual:  # loaded first: its latency is spent under the weights' stream, not after it
    residual = plgpu.load(r_ref.at[pl.ds(0, padded), cols], mask=live, other=0)

  def x_block(k):  # (padded, block_k) in x's dtype; rows past the batch read as zeros
    return plgpu.load(x_ref.at[pl.ds(0, padded), pl.ds(k * block_k, block_k)], mask=live, other=0)

  def w_block(first_row, k):
    return plgpu.load(w_ref.at[pl.ds(first_row, block_n), pl.ds(k * block_k, block_k)],
                      eviction_policy="evict_first")

  def product(xk, w):  # (padded, block_k) x (block_n, block_k) -> (padded, block_n) float32
    if reduce:  # one row: a multiply and a sum over the inputs, no tensor-core tile to fill
      return jnp.sum(xk.astype(jnp.float32) * w.astype(jnp.float32), axis=1)[None, :]
    return tiles.dot(xk, w, b_contracted=1)

  heads = (j * block_n, outputs + j * block_n) if gate_up else (j * block_n,)

  def body(k, carry):
    squares, accs = carry
    xk = x_block(k)
    if has_norm:  # RMSNorm(x) * g @ w = (x * g @ w) / rms(x): the statistics gather in the same pass
      x32 = xk.astype(jnp.float32)
      squares = squares + jnp.sum(x32 * x32, axis=1)
      xk = xk * g_ref[pl.ds(k * block_k, block_k)][None, :]
    return squares, tuple(acc + product(xk, w_block(first, k)) for acc, first in zip(accs, heads))

  zeros = jnp.zeros((padded, block_n), jnp.float32)
  squares, accs = jax.lax.fori_loop(
      0, steps, body, (jnp.zeros((padded,), jnp.float32), (zeros, zeros) if gate_up else (zeros,)))
  if has_norm:
    inverse_rms = jax.lax.rsqrt(squares / d + eps)[:, None]
    accs = tuple(acc * inverse_rms for acc in accs)
  out = accs[0].astype(o_ref.dtype)
  if gate_up:
    gate = out.astype(jnp.float32)
    silu = (gate / (1.0 + jnp.exp(-gate))).astype(o_ref.dtype)
    out = silu * accs[1].astype(o_ref.dtype)
  if has_residual:
    out = out + residual
  plgpu.store(o_ref.at[pl.ds(0, padded), cols], out.astype(o_ref.dtype), mask=live)


def matvec(x: Array, w: Array, *, norm: Array | None = None, eps: float = 1e-5,
           residual: Array | None = None, gate_up: bool = False, chosen: Settings | None = None,
           interpret: bool | None = None, name: str = "matvec") -> Array:
  """x (B, D) @ w.T for an output-major w (N, D): (B, N) in x's dtype, or (B, N/2) with
  `gate_up`. `norm` (D,): x is RMSNorm'ed (float32 statistics, `eps`) and scaled by it first;
  `residual` (B, N): added to the product; `gate_up`: w is w1 over w3 ((2F, D)) and the result is
  silu(x @ w1.T) * (x @ w3.T), SwiGLU's hidden layer. `chosen`: tiling and launch settings (default
  `settings(B, D)`)."""
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
  rows, d = x.shape
  n = w.shape[0]
  if w.shape[1] != d:
    raise ValueError(f"w {w.shape} is not output-major for x {x.shape}: want (N, {d})")
  chosen = chosen or settings(rows, d)
  if not supported(rows, d, n, gate_up, chosen):
    tiles = f"{chosen.block_k} inputs and {chosen.block_n} outputs" if chosen else "256 inputs"
    raise ValueError(f"matvec takes 1..{MAX_ROWS} rows and whole tiles of {tiles}; got x {x.shape}, "
                     f"w {w.shape}, gate_up={gate_up}")
  if chosen.reduce and rows != 1:
    raise ValueError(f"the multiply-and-sum form takes one row, got {rows}")
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
  block_n = chosen.block_n
  kernel = functools.partial(_kernel, rows=rows, d=d, outputs=outputs, eps=eps,
                             has_norm=norm is not None, has_residual=residual is not None,
                             gate_up=gate_up, block_n=block_n, block_k=chosen.block_k,
                             reduce=chosen.reduce)
  return pl.pallas_call(
      kernel, grid=(outputs // block_n,),
      out_shape=jax.ShapeDtypeStruct((rows, outputs), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=chosen.num_warps, num_stages=chosen.num_stages),
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
