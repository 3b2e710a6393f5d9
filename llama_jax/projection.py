"""What a projection's weight can be, and the one matmul that applies it (`model._project`).

A weight is a plain array, inputs first (`wq` (D, N, H), `wo` (N, H, D), ...), or a small pytree:

  QuantizedTensor  weight-only int8/int4 (GPTQ, Frantar et al. 2022; round-to-nearest): integer
                   `values`, `scales` and asymmetric `zeros` per group of `group_size` inputs and
                   output channel. int4 is packed two a byte, in memory as on disk.
  LoraWeight       a base weight (plain or quantized) and LoRA adapters `a` (in..., r) and
                   `b` (r, out...) applied beside it, x W + scale * (x a) b (Hu et al. 2021).

The algorithms that make them live in `llama_jax.quantize` and `llama_jax.lora`; this module is what
the model, the engine and the checkpoints need to carry and apply them. A stacked (L, ...) weight's
pytree has a leading layers axis on every array leaf; `nn.scan` and the engine slice it like any
other parameter.

The quantized matmul never makes a full-precision copy of the model. Each group's partial product
is taken from the integers converted to the compute dtype and scaled afterwards (always for int8's
one group per output channel, and for int4 at few rows); for int4 over many rows (on a GPU from
2, on the CPU past a group's width) one projection's weight is dequantized for its matmul and
dropped after it. Here the conversion is a fusion of XLA's own, not part of the matmul kernel; the
fused decode kernels (`kernels.matvec`, one row on one GPU) read the integers themselves, which is
where quantized weights are faster than bf16 (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

Array = jax.Array

BITS = (4, 8)
SCALE_DTYPE = jnp.float16  # GPTQ's and AutoGPTQ's choice: 2 bytes a group, 10 mantissa bits


@functools.partial(jax.tree_util.register_dataclass, data_fields=("values", "scales", "zeros"),
                   meta_fields=("bits", "group_size", "shape", "n_in", "output_major"))
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """A weight of `shape` (inputs first, `n_in` of them) as K = prod(inputs) rows of integers per
  output channel O = prod(outputs), in G = K / group_size groups of rows, w = scale * (q - zero).

  values  (..., K, O) int8 (8-bit symmetric: q - 128) or uint8 (8-bit asymmetric); 4-bit:
          (..., K/2, O) uint8, byte r of group g holding rows g*gs + r (low nibble) and
          g*gs + gs/2 + r (high nibble), so that unpacking is elementwise (no interleave)
  scales  (..., G, O) float16
  zeros   (..., G, O) uint8 zero points; None when symmetric (zero 2^(bits-1))

  `output_major` (the engine's decode layout only, `transposed`; never saved): every array has its
  output axis first, `values` (..., O, K) or (..., O, K/2), scales and zeros (..., O, G), so that
  an output channel's integers and its groups' scales are contiguous as a matrix-vector kernel reads
  them (`kernels.matvec`); `shape` is then the 2-D (K, O).
  """
  values: Any
  scales: Any
  zeros: Any
  bits: int
  group_size: int
  shape: tuple[int, ...]
  n_in: int
  output_major: bool = False

  @property
  def in_features(self) -> int:
    return math.prod(self.shape[:self.n_in])

  @property
  def out_features(self) -> int:
    return math.prod(self.shape[self.n_in:])

  @property
  def n_groups(self) -> int:
    return self.in_features // self.group_size

  @property
  def symmetric(self) -> bool:
    return self.zeros is None


@functools.partial(jax.tree_util.register_dataclass, data_fields=("base", "a", "b", "key"),
                   meta_fields=("scale", "dropout"))
@dataclasses.dataclass(frozen=True)
class LoraWeight:
  """`base` (a plain array or a QuantizedTensor) with adapters a (..., in..., r), b (..., r, out...);
  `key` (...,) a PRNG key per layer for dropout on the adapters' input, or None (no dropout)."""
  base: Any
  a: Any
  b: Any
  key: Any
  scale: float  # alpha / rank
  dropout: float


def is_quantized(w: Any) -> bool:
  return isinstance(w, QuantizedTensor)


def is_structured(w: Any) -> bool:
  """A weight that is a pytree of its own rather than one array (quantized, or with adapters)."""
  return isinstance(w, (QuantizedTensor, LoraWeight))


# --- the storage format

def max_int(bits: int) -> int:
  return 2 ** bits - 1


def check_bits(bits: int) -> None:
  if bits not in BITS:
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def pack(q: Array, scales: Array, zeros: Array | None, *, bits: int, group_size: int,
         shape: tuple[int, ...], n_in: int) -> QuantizedTensor:
  """A QuantizedTensor from integers q (..., K, O) in [0, 2^bits - 1] (zero point included),
  scales (..., G, O) and zero points (..., G, O), or None for symmetric (zero 2^(bits-1))."""
  check_bits(bits)
  q = jnp.asarray(q)
  if bits == 8:
    values = (q.astype(jnp.int32) - 128).astype(jnp.int8) if zeros is None else q.astype(jnp.uint8)
  else:
    lead, (k, o) = q.shape[:-2], q.shape[-2:]
    halves = q.astype(jnp.uint8).reshape(lead + (k // group_size, 2, group_size // 2, o))
    values = (halves[..., 0, :, :] | (halves[..., 1, :, :] << 4)).reshape(lead + (k // 2, o))
  return QuantizedTensor(values, jnp.asarray(scales).astype(SCALE_DTYPE),
                         None if zeros is None else jnp.asarray(zeros).astype(jnp.uint8),
                         bits, group_size, tuple(shape), n_in)


def transposed(qt: QuantizedTensor) -> QuantizedTensor:
  """The same weight in the output-major layout (`QuantizedTensor.output_major`), flattened to one
  input and one output axis: integers (..., O, K) (int4: (..., O, K/2), the bytes of a group in the
  same order), scales and zeros (..., O, G)."""
  if qt.output_major:
    return qt
  flip = lambda a: None if a is None else jnp.swapaxes(a, -1, -2)  # noqa: E731
  return dataclasses.replace(qt, values=flip(qt.values), scales=flip(qt.scales), zeros=flip(qt.zeros),
                             shape=(qt.in_features, qt.out_features), n_in=1, output_major=True)


def _grouped(x: Array, group_size: int, output_major: bool = False) -> Array:
  """(..., K, O) -> (..., G, group_size, O); output-major (..., O, K) -> (..., O, G, group_size)."""
  if output_major:
    return x.reshape(x.shape[:-1] + (x.shape[-1] // group_size, group_size))
  return x.reshape(x.shape[:-2] + (x.shape[-2] // group_size, group_size, x.shape[-1]))


def signed_groups(qt: QuantizedTensor, dtype, after: Array | None = None) -> list[Array]:
  """q - zero in `dtype`, exactly (integers of at most 9 bits): [(..., G, gs, O)] for 8-bit, and for
  4-bit the two halves of every group, [(..., G, gs/2, O), (..., G, gs/2, O)]; output-major,
  (..., O, G, gs) and (..., O, G, gs/2).

  `after`: an array the conversion is made to depend on (by adding an integer zero computed from
  its first element, which XLA cannot fold away), so that it happens where the weight is used.
  Without it XLA hoists the loop-invariant conversion of every weight out of the decode loop (and
  out of gradient accumulation), or schedules all of them at the top of the loop's body: either
  way a full-precision copy of the model (seen on the CPU backend; `jax.lax.optimization_barrier`
  did not prevent the second). Where the activations are split over devices, reading their first
  element is one scalar broadcast per matmul."""
  values = qt.values
  if after is not None:
    values = values + (jnp.ravel(after)[0] * 0).astype(values.dtype)
  if qt.bits == 8:
    ints = [_grouped(values, qt.group_size, qt.output_major).astype(dtype)]
  else:
    packed = _grouped(values, qt.group_size // 2, qt.output_major)
    ints = [(packed & 0xF).astype(dtype), (packed >> 4).astype(dtype)]
  if qt.zeros is not None:
    zeros = qt.zeros.astype(dtype)
    zero = zeros[..., None] if qt.output_major else zeros[..., :, None, :]
    return [i - zero for i in ints]
  if qt.bits == 4:
    return [i - 8 for i in ints]
  return ints


def _dequantized_matrix(qt: QuantizedTensor, dtype, after: Array | None = None) -> Array:
  """The weight in `dtype` as stored: (..., K, O), or (..., O, K) output-major."""
  ints = signed_groups(qt, jnp.float32, after)
  lead = qt.values.shape[:-2]
  scales = qt.scales.astype(jnp.float32)
  if qt.output_major:
    ints = ints[0] if len(ints) == 1 else jnp.concatenate(ints, axis=-1)  # (..., O, G, gs)
    w = ints * scales[..., None]
    return w.reshape(lead + (qt.out_features, qt.in_features)).astype(dtype)
  ints = ints[0] if len(ints) == 1 else jnp.concatenate(ints, axis=-2)  # (..., G, gs, O)
  w = ints * scales[..., :, None, :]
  return w.reshape(lead + (qt.in_features, qt.out_features)).astype(dtype)


def dequantize(qt: QuantizedTensor, dtype=jnp.float32, after: Array | None = None) -> Array:
  """The weight in `dtype`, of shape (..., *qt.shape) (inputs first, whatever the storage)."""
  w = _dequantized_matrix(qt, dtype, after)
  if qt.output_major:
    w = jnp.swapaxes(w, -1, -2)
  return w.reshape(qt.values.shape[:-2] + tuple(qt.shape))


def nbytes(tree: Any) -> int:
  """Bytes of every array leaf (quantized weights at their packed size)."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _quantized_alike(weights: list, axis: int) -> bool:
  """Quantized weights that differ only in their first output axis, and `axis` is that one (in the
  checkpoint's input-major layout: the engine joins weights before `transposed`)."""
  if not all(is_quantized(w) and not w.output_major for w in weights):
    return False

  def layout(w: QuantizedTensor) -> tuple:
    return (w.bits, w.group_size, w.n_in, w.symmetric, w.values.ndim, w.shape[:w.n_in],
            w.shape[w.n_in + 1:])

  first = weights[0]
  return all(layout(w) == layout(first) for w in weights) and axis == first.values.ndim - 2 + first.n_in


def concatenates(weights: list, axis: int) -> bool:
  """Whether `concatenate` joins these weights: all plain, or all quantized alike (a mix, or
  adapted weights, do not fuse)."""
  return not any(map(is_structured, weights)) or _quantized_alike(weights, axis)


def concatenate(weights: list, axis: int) -> Any:
  """Weights side by side along `axis` of their (per-layer) shape, as one matmul's weight: plain
  arrays as `jnp.concatenate`; quantized ones (same bits, groups, inputs, scheme) along their first
  output axis, which is where their flattened output channels meet. Adapted weights do not fuse."""
  if not any(map(is_structured, weights)):
    return jnp.concatenate(weights, axis=axis)
  first = weights[0]
  if not all(isinstance(w, QuantizedTensor) for w in weights):
    raise TypeError("only plain or quantized weights are concatenated (adapters: merge them first)")
  if not _quantized_alike(weights, axis):
    raise ValueError(f"quantized weights concatenate along their first output axis "
                     f"({first.values.ndim - 2 + first.n_in}) when all else about them agrees; got axis {axis}")
  cat = lambda *xs: None if xs[0] is None else jnp.concatenate(xs, axis=-1)  # noqa: E731
  shape = first.shape[:first.n_in] + (sum(w.shape[first.n_in] for w in weights),) + first.shape[first.n_in + 1:]
  return QuantizedTensor(cat(*[w.values for w in weights]), cat(*[w.scales for w in weights]),
                         cat(*[w.zeros for w in weights]), first.bits, first.group_size, shape, first.n_in)


# --- the matmul

def _pins_conversion() -> bool:
  """Whether the conversion of the per-group products' integers must be tied to its use
  (`signed_groups`' `after`). XLA's CPU backend hoists a loop-invariant conversion out of the decode
  loop, making a full-precision copy of the model; the GPU backend did not (measured on an H200,
  benchmarks/quantized_matmul.py: the same peak memory with and without), and there the tie costs
  1.7x at one row and 2.2x at 16 (int8: it keeps the conversion out of the dot's fusion). The
  whole-weight dequantization of `_quantized_matmul`'s many-rows branch stays tied everywhere
  (measured that way; untied, a GPU's hoisting was not checked)."""
  return jax.default_backend() == "cpu"


def _quantized_matmul(x: Array, qt: QuantizedTensor, dtype) -> Array:
  """x (M, K) @ the (K, O) weight -> (M, O) float32."""
  m, gs = x.shape[0], qt.group_size
  pin = _pins_conversion()
  # Several rows over many groups: dequantize the one weight, then one matmul. On a GPU from 2 rows
  # (H200, int4 g128, 16 rows: 1.52 ms a decode step's matmuls, against 1.99 through per-group
  # partial products); on the CPU from more rows than a group has, where the (M, G, O) partial
  # products would outweigh the (K, O) weight itself.
  if qt.n_groups > 1 and m > (gs if pin else 1):
    w = _dequantized_matrix(qt, dtype, after=x)
    form = "MK,OK->MO" if qt.output_major else "MK,KO->MO"
    return jnp.einsum(form, x, w, preferred_element_type=jnp.float32)
  if pin:  # XLA's CPU backend has no bf16 x bf16 -> f32 batched dot; the CPU gains nothing from bf16
    x, dtype = x.astype(jnp.float32), jnp.float32
  xg = x.reshape(m, qt.n_groups, gs)  # (M, G, C)
  ints = signed_groups(qt, dtype, after=x if pin else None)
  width = gs // len(ints)  # 4-bit: the group's two halves multiply the two nibbles
  form = "MGC,OGC->MGO" if qt.output_major else "MGC,GCO->MGO"
  partial = sum(jnp.einsum(form, xg[..., i * width:(i + 1) * width], q,
                           preferred_element_type=jnp.float32) for i, q in enumerate(ints))
  return jnp.einsum("MGO,OG->MO" if qt.output_major else "MGO,GO->MO", partial,
                    qt.scales.astype(jnp.float32))  # (M, O)


def _split_equation(equation: str, n_in: int) -> tuple[str, str, str, str]:
  """'BTNH,NHD->BTD' with 2 inputs -> (x letters, weight input letters, weight output letters, out)."""
  lhs, out = equation.split("->")
  xs, ws = lhs.split(",")
  return xs, ws[:n_in], ws[n_in:], out


def _quantized_project(equation: str, x: Array, qt: QuantizedTensor, dtype, out_dtype) -> Array:
  xs, ins, outs, out = _split_equation(equation, qt.n_in)
  if qt.output_major:  # the weight's letters are (out, in), as the engine's decode layout names them
    ws = equation.split("->")[0].split(",")[1]
    ins, outs = ws[-qt.n_in:], ws[:-qt.n_in]
  lead = xs[:len(xs) - len(ins)]
  if xs[len(lead):] != ins or out != lead + outs:
    # Not the (..., in) @ (in, out) shape every projection of the model has: the plain way.
    w = _dequantized_matrix(qt, dtype) if qt.output_major else dequantize(qt, dtype)
    return jnp.einsum(equation, x, w, preferred_element_type=out_dtype)
  batch = x.shape[:len(lead)]
  y = _quantized_matmul(x.reshape(-1, qt.in_features).astype(dtype), qt, dtype)
  return y.reshape(batch + tuple(qt.shape[qt.n_in:])).astype(out_dtype or dtype)


def _lora_delta(equation: str, x: Array, w: LoraWeight, dtype) -> Array:
  n_in = w.a.ndim - 1
  xs, ins, outs, out = _split_equation(equation, n_in)
  r = next(c for c in "RZYXWUQPO" if c not in equation)
  rest = "".join(c for c in xs if c not in ins)
  if w.key is not None and w.dropout > 0:
    keep = jax.random.bernoulli(w.key, 1.0 - w.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - w.dropout), 0).astype(x.dtype)
  h = jnp.einsum(f"{xs},{ins}{r}->{rest}{r}", x, w.a.astype(dtype))
  return jnp.einsum(f"{rest}{r},{r}{outs}->{out}", h, w.b.astype(dtype)) * jnp.asarray(w.scale, dtype)


def _plain_project(equation: str, x: Array, w: Array, out_dtype) -> Array:
  """einsum(equation, x, w) as one 2-D matmul over the flattened contracted and output axes: with a
  single token in flight (decoding), a contraction over two axes (wo's heads and head dim)
  compiles on GPUs to a broadcast multiply that writes a tensor of the weight's size, then a
  reduction (measured on an H200: 16 us for TinyLlama's wo, whose bytes need 2). The weight's
  contracted axes come first (in..., out...) or last (out..., in...: the engine's `wo_t`)."""
  (xs, ws), out = equation.split("->")[0].split(","), equation.split("->")[1]
  n_in = sum(1 for c in ws if c in xs)
  lead = xs[:len(xs) - n_in]
  if ws[:n_in] == xs[len(lead):] and out == lead + ws[n_in:]:  # (in..., out...): the usual layout
    fan_in, out_shape, form = math.prod(w.shape[:n_in]), w.shape[n_in:], "...i,io->...o"
  elif ws[-n_in:] == xs[len(lead):] and out == lead + ws[:-n_in]:  # (out..., in...)
    fan_in, out_shape, form = math.prod(w.shape[-n_in:]), w.shape[:-n_in], "...i,oi->...o"
  else:  # not a projection's shape: as written
    return jnp.einsum(equation, x, w, preferred_element_type=out_dtype)
  batch = x.shape[:len(lead)]
  w = w.reshape(fan_in, -1) if form == "...i,io->...o" else w.reshape(-1, fan_in)
  y = jnp.einsum(form, x.reshape(*batch, fan_in), w, preferred_element_type=out_dtype)
  return y.reshape(*batch, *out_shape)


def project(equation: str, x: Array, w: Any, dtype, out_dtype=None) -> Array:
  """einsum(equation, x, w) in the compute `dtype` (the result in `out_dtype`, default `dtype`), for
  any weight this module describes."""
  if isinstance(w, LoraWeight):
    y = project(equation, x, w.base, dtype, out_dtype)
    return y + _lora_delta(equation, x, w, dtype).astype(y.dtype)
  if isinstance(w, QuantizedTensor):
    return _quantized_project(equation, x, w, dtype, out_dtype)
  return _plain_project(equation, x, w.astype(dtype), out_dtype)


# --- placement: a structured weight's leaves follow the sharding of the plain weight it stands for

def _merged_axes(entries) -> Any:
  axes = []
  for e in entries:
    if e is not None:
      axes.extend(e if isinstance(e, tuple) else (e,))
  return tuple(axes) if len(axes) > 1 else (axes[0] if axes else None)


def _fits(mesh, axes, size: int) -> Any:
  """`axes` if they divide `size`, else None (that dimension replicated)."""
  if axes is None:
    return None
  n = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
  return axes if size % n == 0 else None


def _lora_axes(w: LoraWeight) -> tuple[int, int]:
  """(leading stacked axes, input axes) of an adapted weight: the base has lead + in + out axes,
  a lead + in + 1, b lead + 1 + out."""
  if isinstance(w.base, QuantizedTensor):
    return len(w.base.values.shape) - 2, w.base.n_in
  n_lead = len(w.a.shape) + len(w.b.shape) - len(w.base.shape) - 2
  return n_lead, len(w.a.shape) - n_lead - 1


def _structured_sharding(plain: NamedSharding, w: Any) -> Any:
  mesh = plain.mesh
  if isinstance(w, LoraWeight):
    n_lead, n_in = _lora_axes(w)
    spec = tuple(plain.spec) + (None,) * (n_lead + len(w.a.shape) + len(w.b.shape))
    lead, ins, outs = spec[:n_lead], spec[n_lead:n_lead + n_in], spec[n_lead + n_in:]
    n_out = len(w.b.shape) - n_lead - 1
    return LoraWeight(_structured_sharding(plain, w.base),
                      NamedSharding(mesh, P(*lead, *ins, None)),
                      NamedSharding(mesh, P(*lead, None, *outs[:n_out])),
                      None if w.key is None else NamedSharding(mesh, P(*lead)), w.scale, w.dropout)
  if isinstance(w, QuantizedTensor):
    if w.output_major:  # the engine makes that layout from weights already placed
      raise ValueError("an output-major (decode layout) quantized weight is placed before `transposed`")
    n_lead = len(w.values.shape) - 2
    spec = tuple(plain.spec) + (None,) * (n_lead + len(w.shape))
    lead = spec[:n_lead]
    ins = _merged_axes(spec[n_lead:n_lead + w.n_in])
    outs = _fits(mesh, _merged_axes(spec[n_lead + w.n_in:n_lead + len(w.shape)]), w.out_features)
    values = NamedSharding(mesh, P(*lead, _fits(mesh, ins, w.values.shape[-2]), outs))
    groups = NamedSharding(mesh, P(*lead, _fits(mesh, ins, w.n_groups), outs))
    return QuantizedTensor(values, groups, None if w.zeros is None else groups, w.bits,
                           w.group_size, w.shape, w.n_in)
  return plain


def shardings_like(tree: Any, plain_shardings: Any) -> Any:
  """Shardings for `tree`, whose weights may be structured, from the shardings of the plain
  parameter tree it stands for (`sharding.param_shardings`): a quantized weight's integers and
  scales are split like the inputs and outputs of the weight (where the sizes allow), adapters like
  the base weight's inputs (a) and outputs (b)."""
  return jax.tree.map(_structured_sharding, plain_shardings, tree,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


# --- on disk: a quantized weight is saved as a dict of its arrays, described in quantization.json

def _items(tree: Any, prefix: tuple = ()):
  """(path, value) of every structured weight or array in a nested dict."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _items(v, prefix + (k,))
  else:
    yield prefix, tree


def replace_at(tree: Any, path: tuple, value: Any) -> Any:
  """A copy of the nested dict `tree` with `value` at `path` (only the dicts on the path copied)."""
  if not path:
    return value
  return {**tree, path[0]: replace_at(tree[path[0]], path[1:], value)}


def describe(tree: Any) -> dict[str, dict]:
  """{"layers/block/attention/wq": {"bits", "group_size", "shape", "n_in", "symmetric"}, ...} for
  every quantized weight of a parameter tree (empty when none is)."""
  out = {}
  for path, w in _items(tree):
    if isinstance(w, LoraWeight):
      raise ValueError(f"{'/'.join(path)}: a weight with LoRA adapters is not saved as a model; merge "
                       "the adapters (python -m llama_jax.convert --merge_lora) or save them on their own")
    if isinstance(w, QuantizedTensor) and w.output_major:
      raise ValueError(f"{'/'.join(path)}: the engine's output-major decode layout is not a "
                       "checkpoint's; save the model's own parameters")
    if isinstance(w, QuantizedTensor):
      out["/".join(path)] = {"bits": w.bits, "group_size": w.group_size, "shape": list(w.shape),
                             "n_in": w.n_in, "symmetric": w.symmetric}
  return out


def to_saved(tree: Any) -> Any:
  """The tree with each QuantizedTensor as {"values", "scales"[, "zeros"]}: plain nested dicts."""
  for path, w in list(_items(tree)):
    if isinstance(w, QuantizedTensor):
      arrays = {"values": w.values, "scales": w.scales}
      if w.zeros is not None:
        arrays["zeros"] = w.zeros
      tree = replace_at(tree, path, arrays)
  return tree


def from_saved(tree: Any, description: dict[str, dict]) -> Any:
  """The inverse of `to_saved`, given `describe`'s description."""
  for name, d in description.items():
    path = tuple(name.split("/"))
    node = tree
    for k in path:
      node = node[k]
    tree = replace_at(tree, path, QuantizedTensor(
        node["values"], node["scales"], None if d["symmetric"] else node["zeros"], int(d["bits"]),
        int(d["group_size"]), tuple(d["shape"]), int(d["n_in"])))
  return tree


def abstract_saved(plain: Any, description: dict[str, dict]) -> Any:
  """Restore targets in the saved form: `plain` (ShapeDtypeStructs of the unquantized model, each
  with its sharding) with every described weight as its arrays' ShapeDtypeStructs."""
  for name, d in description.items():
    path = tuple(name.split("/"))
    s = plain
    for k in path:
      s = s[k]
    shape, bits, gs, n_in = tuple(d["shape"]), int(d["bits"]), int(d["group_size"]), int(d["n_in"])
    lead = tuple(s.shape[:len(s.shape) - len(shape)])
    k, o = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    if k % gs:
      raise ValueError(f"{name}: group size {gs} does not divide the width {k}")
    sym = bool(d["symmetric"])
    values_dtype = jnp.int8 if bits == 8 and sym else jnp.uint8
    abstract = QuantizedTensor(
        jax.ShapeDtypeStruct(lead + ((k if bits == 8 else k // 2), o), values_dtype),
        jax.ShapeDtypeStruct(lead + (k // gs, o), SCALE_DTYPE),
        None if sym else jax.ShapeDtypeStruct(lead + (k // gs, o), jnp.uint8), bits, gs, shape, n_in)
    sharding = getattr(s, "sharding", None)
    if sharding is not None:
      placed = (_structured_sharding(sharding, abstract) if isinstance(sharding, NamedSharding)
                else jax.tree.map(lambda _: sharding, abstract))
      abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                              abstract, placed)
    plain = replace_at(plain, path, abstract)
  return to_saved(plain)
