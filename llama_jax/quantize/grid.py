"""The integer grid of weight-only quantization: what a group of weights maps to, and back.

Following GPTQ's `quant.py` (Frantar et al. 2022): a group of weights of one output channel is
stored as integers q in [0, 2^bits - 1] with w ~ scale * (q - zero). Asymmetric: the grid spans
[min(w, 0), max(w, 0)] and the zero point is an integer of its own. Symmetric: zero = 2^(bits-1)
and scale = max|w| / (2^(bits-1) - 1), the absmax grid of LLM.int8 (int8: levels -128..127 of
max|w|/127); GPTQ's symmetric grid instead spreads 2 max|w| over 2^bits - 1 steps, which cannot
reach +max|w| exactly. Scales are rounded to their storage dtype (float16) before use, so the grid
a solver optimises against is the one the checkpoint holds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llama_jax import projection

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Grid:
  bits: int
  group_size: int = 0  # inputs per group; 0: one group per output channel (the whole input width)
  symmetric: bool = True

  def __post_init__(self):
    projection.check_bits(self.bits)
    if self.group_size < 0:
      raise ValueError(f"group size must be positive (or 0: one group per output channel), got "
                       f"{self.group_size}")

  def group_size_for(self, width: int, name: str) -> int:
    """The group size for a weight of `width` inputs; a size that does not divide it is an error."""
    size = self.group_size or width
    if width % size:
      raise ValueError(f"group size {size} does not divide the input width {width} of {name}")
    if self.bits == 4 and size % 2:
      raise ValueError(f"4-bit groups pack two values a byte: group size {size} of {name} must be even")
    return size


def params(w: Array, bits: int, symmetric: bool) -> tuple[Array, Array]:
  """(scale, zero), each (..., O), for the group w (..., rows, O): float32 scales rounded to the
  storage dtype, float32 integer zero points."""
  w = w.astype(jnp.float32)
  maxq = projection.max_int(bits)
  if symmetric:
    amax = jnp.max(jnp.abs(w), axis=-2)
    scale = jnp.where(amax == 0, 1.0, amax / (2 ** (bits - 1) - 1))
    scale = scale.astype(projection.SCALE_DTYPE).astype(jnp.float32)
    return scale, jnp.full_like(scale, 2 ** (bits - 1))
  lo = jnp.minimum(jnp.min(w, axis=-2), 0.0)
  hi = jnp.maximum(jnp.max(w, axis=-2), 0.0)
  flat = (lo == 0) & (hi == 0)
  lo, hi = jnp.where(flat, -1.0, lo), jnp.where(flat, 1.0, hi)
  scale = ((hi - lo) / maxq).astype(projection.SCALE_DTYPE).astype(jnp.float32)
  return scale, jnp.clip(jnp.round(-lo / scale), 0, maxq)


def quantize(w: Array, scale: Array, zero: Array, bits: int) -> Array:
  """Integers q = clip(round(w / scale) + zero, 0, 2^bits - 1), float32; scale and zero broadcast."""
  return jnp.clip(jnp.round(w / scale) + zero, 0, projection.max_int(bits))


def dequantize(q: Array, scale: Array, zero: Array) -> Array:
  return scale * (q - zero)
