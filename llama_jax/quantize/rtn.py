"""Round-to-nearest: every group of weights on its own grid, no data needed (the baseline of the
GPTQ paper, and what QLoRA does to a base model on loading)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llama_jax import projection
from llama_jax.quantize import grid as grid_lib
from llama_jax.quantize.grid import Grid


def quantize_weight(w: jax.Array, grid: Grid, n_in: int, n_lead: int = 0,
                    name: str = "weight") -> projection.QuantizedTensor:
  """w (lead..., in..., out...) with `n_lead` leading stacked axes and `n_in` input axes ->
  its QuantizedTensor."""
  lead, shape = w.shape[:n_lead], tuple(w.shape[n_lead:])
  k, o = math.prod(shape[:n_in]), math.prod(shape[n_in:])
  size = grid.group_size_for(k, name)
  groups = w.astype(jnp.float32).reshape(lead + (k // size, size, o))
  scale, zero = grid_lib.params(groups, grid.bits, grid.symmetric)  # (..., G, O)
  q = grid_lib.quantize(groups, scale[..., None, :], zero[..., None, :], grid.bits)
  return projection.pack(q.reshape(lead + (k, o)), scale, None if grid.symmetric else zero,
                         bits=grid.bits, group_size=size, shape=shape, n_in=n_in)
