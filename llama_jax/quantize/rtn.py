"""Round-to-nearest: every group of weights on its own grid, no data needed (the baseline of the
GPTQ paper, and what QLoRA does to a base model on loading)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from llama_jax import projection
from llama_jax.quantize import grid as grid_lib
from llama_jax.quantize.grid import Grid


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric"))
def quantize_matrix(w: jax.Array, *, bits: int, group_size: int,
                    symmetric: bool) -> projection.QuantizedTensor:
  """w (..., K, O) -> its QuantizedTensor of shape (K, O). One compilation per matrix shape, which
  the weights of a model share whatever their axes (the caller sets the weight's own shape)."""
  lead, (k, o) = w.shape[:-2], w.shape[-2:]
  groups = w.astype(jnp.float32).reshape(lead + (k // group_size, group_size, o))
  scale, zero = grid_lib.params(groups, bits, symmetric)  # (..., G, O)
  q = grid_lib.quantize(groups, scale[..., None, :], zero[..., None, :], bits)
  return projection.pack(q.reshape(lead + (k, o)), scale, None if symmetric else zero, bits=bits,
                         group_size=group_size, shape=(k, o), n_in=1)


def quantize_weight(w: jax.Array, grid: Grid, n_in: int, n_lead: int = 0,
                    name: str = "weight") -> projection.QuantizedTensor:
  """w (lead..., in..., out...) with `n_lead` leading stacked axes and `n_in` input axes ->
  its QuantizedTensor."""
  lead, shape = w.shape[:n_lead], tuple(w.shape[n_lead:])
  k, o = math.prod(shape[:n_in]), math.prod(shape[n_in:])
  size = grid.group_size_for(k, name)
  qt = quantize_matrix(w.reshape(lead + (k, o)), bits=grid.bits, group_size=size,
                       symmetric=grid.symmetric)
  return dataclasses.replace(qt, shape=shape, n_in=n_in)
