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

`w` may be quantized (`projection.QuantizedTensor` in the output-major decode layout): the kernel
reads its integers, not a bf16 copy, which is what makes int8/int4 decode at one row faster than
bf16 (XLA converts the integers in a fusion of its own and writes what the dot then reads again).
With
w = scale * (q - zero) per group of inputs and output, a group's product is
  sum_c x_c (q_c - zero) * scale = (sum_c x_c q_c - zero * sum_c x_c) * scale,
the integers converted exactly (symmetric int4's zero point of 8 folded into the conversion). int8
with one group per output channel scales the whole sum once and takes its zero point off once;
smaller groups (int8 or int4, a power of two wide) are a tile axis of their own, `block_k / group`
groups per step, each int4 byte's two nibbles being the group's first and second half
(`projection.pack`); an asymmetric group's zero point comes off once per group and output,
through the group's sum of x (off each weight only where one row's products are kept per input,
`wide`).
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

from llama_jax import projection
from llama_jax.kernels import tiles

Array = jax.Array

MAX_ROWS = 16  # batch rows a kernel takes (Triton's dot on rows padded to 16)


class Settings(NamedTuple):
  """A kernel's tiling and launch: outputs (rows of w) per program, inputs per step of its loop,
  warps, Triton's pipeline stages, and the one-row multiply-and-sum form (`reduce`) or Triton's dot
  on rows padded to 16. `wide` (one row): the products accumulate in a tile of the step's shape and
  are summed once at the end, not at every step (a sum across a program's threads is a round of
  shuffles and a barrier)."""
  block_n: int
  block_k: int
  num_warps: int
  num_stages: int
  reduce: bool
  wide: bool = False


class Weight(NamedTuple):
  """What the kernel needs to know of a weight beyond its shape: `bits` 0 (plain), 8 or 4, and for
  a quantized one its group size and whether it has zero points of its own."""
  bits: int = 0
  group_size: int = 0
  zeros: bool = False

  @staticmethod
  def of(w) -> "Weight":
    if projection.is_quantized(w):
      return Weight(w.bits, w.group_size, not w.symmetric)
    return Weight()

  def grouped(self, d: int) -> bool:
    """Summed a group at a time (int4, or int8 in groups smaller than a whole output channel)."""
    return self.bits == 4 or (self.bits == 8 and self.group_size < d)


def settings(rows: int, d: int, weight: Weight = Weight()) -> Settings | None:
  """The settings measured fastest for a decode block's products (`benchmarks/kernel_sweep.py`,
  TinyLlama's shapes, one row, H100; BENCHMARKS.md "Fused decode blocks"): the multiply-and-sum
  over 4 outputs a program with 4 warps (640 programs for wq|wk|wv: more loads in flight than fewer,
  larger ones) and the longest input step that divides d, 1,024 or 512 (whole groups of a grouped
  weight). Plain and one-group-a-channel weights sum at the end (`wide`; bf16 at 4 warps: wq|wk|wv
  5.7 us against 6.4 summing each step, w2 10.9 against 12.5, w1|w3 18.7 against 18.3), grouped ones
  each step (int4: w1|w3 12.2 us against 14.4). Grouped ones step over up to 2,048 inputs (int4:
  wq|wk|wv 4.4 us against 5.1 at 1,024; the sweep's decode with them 0.82 ms against 0.90, its w2
  there at 2 outputs a program, summed at the end: 8.2 us against this rule's 8.7). A batch:
  Triton's dot over 16 outputs and 256 inputs (whole groups). None if nothing tiles."""
  grouped = weight.grouped(d)
  gs = weight.group_size
  if grouped and (gs < 32 or gs & (gs - 1) or d % gs):
    return None  # Triton's tiles are powers of two (int4: half a group, at least 16 for its dot)
  fits = lambda k: d % k == 0 and (not grouped or k % gs == 0)  # noqa: E731
  if rows == 1:
    step = next((k for k in ((2048, 1024, 512) if grouped else (1024, 512)) if fits(k)), None)
    if step:
      return Settings(4, step, 4, 4, True, wide=not grouped)
    if grouped:  # groups of more than 1,024, or widths not a multiple of 512 (unmeasured)
      return Settings(4, next(k for k in (256, 128, 64, 32, gs) if fits(k)), 4, 4, True)
  if grouped:
    return Settings(16, next(k for k in (256, 128, 64, 32, gs) if fits(k)), 4, 4, False)
  return Settings(16, 256, 4, 4, False) if d % 256 == 0 else None


def supported(rows: int, d: int, n: int, gate_up: bool = False, chosen: Settings | None = None,
              weight: Weight = Weight()) -> bool:
  """Whether x (rows, d) @ w (n, d) runs as one kernel (with `chosen` settings, else the default
  ones): whole blocks of outputs and of inputs (of groups, for a grouped weight)."""
  if not 0 < rows <= MAX_ROWS or (gate_up and n % 2):
    return False
  chosen = chosen or settings(rows, d, weight)
  outputs = n // 2 if gate_up else n
  if chosen is None or d % chosen.block_k or outputs % chosen.block_n:
    return False
  return not weight.grouped(d) or chosen.block_k % weight.group_size == 0


def _kernel(*refs, rows: int, d: int, outputs: int, eps: float, has_norm: bool, has_residual: bool,
            gate_up: bool, block_n: int, block_k: int, reduce: bool, wide: bool, weight: Weight):
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
  refs = list(refs)
  x_ref, w_ref = refs.pop(0), refs.pop(0)
  s_ref = refs.pop(0) if weight.bits else None  # scales (N, G) float16
  z_ref = refs.pop(0) if weight.zeros else None  # zero points (N, G) uint8
  g_ref = refs.pop(0) if has_norm else None
  r_ref = refs.pop(0) if has_residual else None
  (o_ref,) = refs
  padded = 1 if reduce else tiles.dot_rows(rows)
  live = (jnp.arange(padded) < rows)[:, None]
  f32 = jnp.float32
  grouped, int4 = weight.grouped(d), weight.bits == 4
  halves = (0, 1) if int4 else (None,)  # an int4 byte's low nibble is its group's first half

  def row_sums(a):  # (padded, 1) float32: each row's sum over a tile's other axes
    a = a.astype(f32)
    while a.ndim > 2:
      a = jnp.sum(a, axis=-1)
    return jnp.sum(a, axis=1)[:, None]

  def normed(xk, g_index):  # x (scaled by the norm's weight), and each row's sum of squares
    if not has_norm:
      return xk, 0.0
    x32 = xk.astype(f32)
    return xk * g_ref[g_index][None], row_sums(x32 * x32)

  def per_output(ref, first, group):  # (block_n,) float32: scales or zeros of one group
    return plgpu.load(ref.at[pl.ds(first, block_n), jnp.int32(group)]).astype(f32)

  def nibbles(ints, half):
    return ints if half is None else (ints & 0xF if half == 0 else ints >> 4)

  def exact(ints, half=None):
    # float32 q (less 8, symmetric int4's zero point) without an integer-to-float conversion, an
    # instruction at a quarter of the FMA's rate that bounded the one-row kernels on integers: the
    # integer is put in the low mantissa bits of 2^23 (whose float32 spacing is 1), and 2^23 taken off.
    i = nibbles(ints.astype(jnp.int32), half)
    offset = 8388608.0
    if ints.dtype == jnp.int8:  # symmetric int8, stored as q - 128
      i, offset = i + 128, offset + 128
    elif int4 and not weight.zeros:
      offset += 8
    return jax.lax.bitcast_convert_type(i | 0x4B000000, f32) - offset

  def as_float(ints):
    return exact(ints) if weight.bits else ints.astype(f32)

  def product(xk, ints):  # (padded, width) x (block_n, width) -> (padded, block_n) float32
    if reduce:  # one row: a multiply and a sum over the inputs, no tensor-core tile to fill
      return jnp.sum(xk.astype(f32) * as_float(ints), axis=1)[None, :]
    return tiles.dot(xk, ints.astype(xk.dtype), b_contracted=1)  # integers of <= 8 bits: exact in bf16

  # This program's outputs, j*block_n.. (and w3's, for gate_up).
  j = pl.program_id(0)
  cols = pl.ds(j * block_n, block_n)
  if has_residual:  # loaded first: its latency is spent under the weights' stream, not after it
    residual = plgpu.load(r_ref.at[pl.ds(0, padded), cols], mask=live, other=0)
  heads = (j * block_n, outputs + j * block_n) if gate_up else (j * block_n,)

  def group_sum_step(k, squares, accs):
    # One row, whole groups: x (1, groups, width) against the integers (block_n, groups, width),
    # scaled per group; summed over each group's inputs every step, or kept as they are (`wide`).
    per_step = block_k // weight.group_size
    groups = pl.ds(k * per_step, per_step)
    xs = []
    for half in halves:
      at = (groups, jnp.int32(half), slice(None)) if int4 else (groups, slice(None))
      xk, sq = normed(plgpu.load(x_ref.at[(pl.ds(0, 1),) + at]), at)
      xs.append(xk.astype(f32))
      squares = squares + sq
    x_sums = sum(jnp.sum(xk, axis=2) for xk in xs) if weight.zeros and not wide else None  # (1, groups)
    accs = list(accs)
    for h, first in enumerate(heads):
      ints = plgpu.load(w_ref.at[pl.ds(first, block_n), groups, :], eviction_policy="evict_first")
      zero = plgpu.load(z_ref.at[pl.ds(first, block_n), groups]).astype(f32) if weight.zeros else None
      scales = plgpu.load(s_ref.at[pl.ds(first, block_n), groups]).astype(f32)  # (block_n, groups)
      if wide:  # kept per input: the zero point comes off each weight
        shift = 0.0 if zero is None else zero[:, :, None]
        terms = sum(xk * (exact(ints, half) - shift) for xk, half in zip(xs, halves))
        accs[h] = accs[h] + terms * scales[:, :, None]
      else:  # summed per group: the zero point comes off once, times the group's sum of x
        part = sum(jnp.sum(xk * exact(ints, half), axis=2) for xk, half in zip(xs, halves))
        if zero is not None:
          part = part - zero * x_sums
        accs[h] = accs[h] + part * scales
    return squares, tuple(accs)

  def group_dot_step(k, squares, accs):  # rows padded for Triton's dot: a group at a time
    per_step = block_k // weight.group_size
    accs = list(accs)
    for i in range(per_step):
      group = k * per_step + i
      xs, sums = [], []
      for half in halves:
        at = (group, jnp.int32(half), slice(None)) if int4 else (group, slice(None))
        xk, sq = normed(plgpu.load(x_ref.at[(pl.ds(0, padded),) + at], mask=live, other=0), at)
        xs.append(xk)
        squares, sums = squares + sq, sums + [row_sums(xk)]
      for h, first in enumerate(heads):
        ints = plgpu.load(w_ref.at[pl.ds(first, block_n), group, :], eviction_policy="evict_first")
        part = sum(product(xk, nibbles(ints, half)) for xk, half in zip(xs, halves))
        zero = per_output(z_ref, first, group)[None, :] if weight.zeros else (8.0 if int4 else None)
        if zero is not None:
          part = part - zero * sum(sums)
        accs[h] = accs[h] + part * per_output(s_ref, first, group)[None, :]
    return squares, tuple(accs)

  def step(k, squares, sums, accs):  # weights plain or in one group per output: block_k inputs
    inputs = pl.ds(k * block_k, block_k)
    xk, sq = normed(plgpu.load(x_ref.at[pl.ds(0, padded), inputs], mask=live, other=0), inputs)
    if weight.zeros:
      sums = sums + row_sums(xk)
    new = []
    for acc, first in zip(accs, heads):
      ints = plgpu.load(w_ref.at[pl.ds(first, block_n), inputs], eviction_policy="evict_first")
      new.append(acc + xk.astype(f32) * as_float(ints) if wide else acc + product(xk, ints))
    return squares + sq, sums, tuple(new)

  def body(k, carry):
    squares, sums, accs = carry
    if grouped:
      squares, accs = (group_sum_step if reduce else group_dot_step)(k, squares, accs)
      return squares, sums, accs
    return step(k, squares, sums, accs)

  summed_at_end = (grouped and reduce) or wide
  if grouped and reduce:  # kept per group (and input, if wide)
    shape = (block_n, block_k // weight.group_size) + ((weight.group_size // len(halves),) if wide else ())
  else:
    shape = (block_n, block_k) if wide else (padded, block_n)
  start = jnp.zeros(shape, f32)
  row = jnp.zeros((padded, 1), f32)
  squares, sums, accs = jax.lax.fori_loop(0, d // block_k, body,
                                          (row, row, (start, start) if gate_up else (start,)))
  if summed_at_end:
    accs = tuple(row_sums(acc).reshape(1, block_n) for acc in accs)
  if weight.bits and not grouped:  # one group per output channel: scaled once, at the end
    accs = tuple((acc - (per_output(z_ref, first, 0)[None, :] * sums if weight.zeros else 0))
                 * per_output(s_ref, first, 0)[None, :] for acc, first in zip(accs, heads))
  if has_norm:
    inverse_rms = jax.lax.rsqrt(squares / d + eps)
    accs = tuple(acc * inverse_rms for acc in accs)
  out = accs[0].astype(o_ref.dtype)
  if gate_up:
    gate = out.astype(f32)
    silu = (gate / (1.0 + jnp.exp(-gate))).astype(o_ref.dtype)
    out = silu * accs[1].astype(o_ref.dtype)
  if has_residual:
    out = out + residual
  plgpu.store(o_ref.at[pl.ds(0, padded), cols], out.astype(o_ref.dtype), mask=live)


def _shape(w) -> tuple[int, int]:
  """(outputs, inputs) of an output-major weight, plain or quantized."""
  if projection.is_quantized(w):
    if not w.output_major:
      raise ValueError("a quantized w must be in the output-major decode layout (projection.transposed)")
    return w.out_features, w.in_features
  return w.shape


def matvec(x: Array, w, *, norm: Array | None = None, eps: float = 1e-5,
           residual: Array | None = None, gate_up: bool = False, chosen: Settings | None = None,
           interpret: bool | None = None, name: str = "matvec") -> Array:
  """x (B, D) @ w.T for an output-major w (N, D) (plain, or a `projection.QuantizedTensor` in the
  output-major decode layout): (B, N) in x's dtype, or (B, N/2) with `gate_up`. `norm` (D,): x is
  RMSNorm'ed (float32 statistics, `eps`) and scaled by it first; `residual` (B, N): added to the
  product; `gate_up`: w is w1 over w3 ((2F, D)) and the result is silu(x @ w1.T) * (x @ w3.T),
  SwiGLU's hidden layer. `chosen`: tiling and launch settings (default `settings(B, D, ...)`)."""
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
  rows, d = x.shape
  n, w_d = _shape(w)
  if w_d != d:
    raise ValueError(f"w {(n, w_d)} is not output-major for x {x.shape}: want (N, {d})")
  weight = Weight.of(w)
  if weight.bits and w.scales.shape != (n, d // weight.group_size):
    raise ValueError(f"scales {w.scales.shape} are not output-major for {n} outputs in "
                     f"{d // weight.group_size} groups (projection.transposed makes them)")
  chosen = chosen or settings(rows, d, weight)
  if not supported(rows, d, n, gate_up, chosen, weight):
    tiles = f"{chosen.block_k} inputs and {chosen.block_n} outputs" if chosen else "256 inputs"
    what = f", groups of {weight.group_size}" if weight.grouped(d) else ""
    raise ValueError(f"matvec takes 1..{MAX_ROWS} rows and whole tiles of {tiles}{what}; got x "
                     f"{x.shape}, w {(n, d)}, gate_up={gate_up}")
  if chosen.reduce and rows != 1:
    raise ValueError(f"the multiply-and-sum form takes one row, got {rows}")
  if chosen.wide and not chosen.reduce:
    raise ValueError("`wide` is a setting of the one-row (multiply-and-sum) form")
  outputs = n // 2 if gate_up else n
  if residual is not None and residual.shape != (rows, outputs):
    raise ValueError(f"residual {residual.shape} is not the output's shape {(rows, outputs)}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if weight.grouped(d):  # a group's inputs on an axis of their own (int4: and its two halves)
    gs = weight.group_size
    groups = (d // gs, 2, gs // 2) if weight.bits == 4 else (d // gs, gs)
    x, norm = x.reshape((rows,) + groups), None if norm is None else norm.reshape(groups)
    values = w.values.reshape((n,) + groups[:1] + groups[-1:])
  else:
    values = w.values if weight.bits else w.astype(x.dtype)
  operands = [x, values]
  if weight.bits:
    operands += [w.scales] + ([w.zeros] if weight.zeros else [])
  if norm is not None:
    operands.append(norm.astype(x.dtype))
  if residual is not None:
    operands.append(residual.astype(x.dtype))
  block_n = chosen.block_n
  kernel = functools.partial(_kernel, rows=rows, d=d, outputs=outputs, eps=eps,
                             has_norm=norm is not None, has_residual=residual is not None,
                             gate_up=gate_up, block_n=block_n, block_k=chosen.block_k,
                             reduce=chosen.reduce, wide=chosen.wide, weight=weight)
  return pl.pallas_call(
      kernel, grid=(outputs // block_n,),
      out_shape=jax.ShapeDtypeStruct((rows, outputs), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=chosen.num_warps, num_stages=chosen.num_stages),
      interpret=interpret, name=name)(*operands)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
  """RMSNorm in plain XLA, `model.RMSNorm`'s arithmetic (it calls this): the statistics in float32,
  as Meta's `_norm(x.float())`, the normalised value rounded to x's dtype, then scaled by the weight
  in that dtype."""
  x32 = x.astype(jnp.float32)
  normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
  return normed * weight.astype(x.dtype)


def reference(x: Array, w, *, norm: Array | None = None, eps: float = 1e-5,
              residual: Array | None = None, gate_up: bool = False) -> Array:
  """The same in plain XLA, as the model computes it (a quantized weight's products in float32,
  as the model's per-group products accumulate)."""
  if norm is not None:
    x = rms_norm(x, norm, eps)
  if projection.is_quantized(w):
    out = jnp.einsum("BD,DN->BN", x.astype(jnp.float32), projection.dequantize(w),
                     precision="highest")
  else:
    out = jnp.einsum("BD,ND->BN", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
  out = out.astype(x.dtype)
  if gate_up:
    gate, up = jnp.split(out, 2, axis=-1)
    out = jax.nn.silu(gate) * up
  if residual is not None:
    out = out + residual.astype(x.dtype)
  return out
