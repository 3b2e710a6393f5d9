"""The key/value cache of decoding: one (B, K, S, H) buffer pair per layer, written in place.

(B, K, S, H) is the layout attention's batched matmuls (batch B and K) read, so no step transposes
the cache. Each layer has buffers of its own (a tuple, not one stacked (L, ...) array): a stacked
cache sliced per layer and restacked inside the jitted loop was a copy of the whole cache per step.
Rows write at their own positions, so the rows of one batch may be at different lengths.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llama_jax import model as M
from llama_jax.config import ModelConfig

Array = jax.Array


class KVCache(NamedTuple):
  """One layer's cache: keys and values (B, K, S, H). Satisfies `model.LayerCache`."""
  k: Array
  v: Array
  layout = "BKSH"

  @property
  def length(self) -> int:
    return self.k.shape[2]

  def write(self, k: Array, v: Array, positions: Array) -> "KVCache":
    """k, v (B, T, K, H) written at each row's positions (B, T). A scatter into the carried
    buffers, which XLA does in place inside the decode loop. Indexed (rows, :, positions), numpy
    puts the indexed (B, T) first, so the slots written are (B, T, K, H), the shape of k and v."""
    rows = jnp.arange(k.shape[0])[:, None]  # (B, 1)
    where = (rows, slice(None), positions)
    return KVCache(self.k.at[where].set(k.astype(self.k.dtype)),
                   self.v.at[where].set(v.astype(self.v.dtype)))

  def read(self, dtype) -> tuple[Array, Array]:
    return self.k.astype(dtype), self.v.astype(dtype)


def init_cache(cfg: ModelConfig, batch_size: int, length: int, dtype=None) -> tuple[KVCache, ...]:
  """Zeroed buffers for every layer: (B, K, S, H) each, in the compute dtype by default."""
  shape = (batch_size, cfg.n_kv_heads, length, cfg.head_dim)
  dtype = dtype or cfg.dtype
  return tuple(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers))


def shard_cache(cache, mesh: Mesh, rules) -> tuple[KVCache, ...]:
  """Inside a jitted function: the cache split over the mesh as the K/V heads it holds are (and
  the rows as the batch is)."""
  table = dict(rules)
  spec = P(table.get(M.BATCH), table.get(M.KV_HEADS), None, None)
  return jax.tree.map(lambda buf: jax.lax.with_sharding_constraint(buf, NamedSharding(mesh, spec)), cache)
