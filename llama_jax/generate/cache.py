"""The key/value cache of decoding: one (B, K, S, H) buffer pair per layer, written in place.

(B, K, S, H) is the layout attention's batched matmuls (batch B and K) read, so no step transposes
the cache. Each layer has buffers of its own (a tuple, not one stacked (L, ...) array): a stacked
cache sliced per layer and restacked inside the jitted loop was a copy of the whole cache per step.
Rows write at their own positions, so the rows of one batch may be at different lengths.

The server's decode calls work on a `window` of the cache (its leading rows and positions, copied
once per call) and `write_back` what they wrote, so a step over short requests reads only the part
of the cache they have filled. Its batched prefill writes into chosen rows (`RowWriter`).
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
  write_only = False

  @property
  def length(self) -> int:
    return self.k.shape[2]

  def write(self, k: Array, v: Array, positions: Array) -> "KVCache":
    """k, v (B, T, K, H) written at each row's positions (B, T). A scatter into the carried
    buffers, which XLA does in place inside the decode loop. Indexed (rows, :, positions), numpy
    puts the indexed (B, T) first, so the slots written are (B, T, K, H), the shape of k and v."""
    return self.write_rows(k, v, jnp.arange(k.shape[0]), positions)

  def write_rows(self, k: Array, v: Array, rows: Array, positions: Array) -> "KVCache":
    """k, v (R, T, K, H) written into rows `rows` of the cache at positions (R, T): rows (R,) one
    cache row per input row, or (R, T) one per token (prompts packed side by side). A row index
    past the last row is dropped: that is how a batched prefill's padding writes nothing."""
    where = (rows if rows.ndim == 2 else rows[:, None], slice(None), positions)
    return KVCache(self.k.at[where].set(k.astype(self.k.dtype), mode="drop"),
                   self.v.at[where].set(v.astype(self.v.dtype), mode="drop"))

  def read(self, dtype) -> tuple[Array, Array]:
    return self.k.astype(dtype), self.v.astype(dtype)


def window(cache: tuple[KVCache, ...], rows: int, length: int) -> tuple[KVCache, ...]:
  """Rows 0..rows-1 and positions 0..length-1 of every layer's cache: a copy the size of the
  window, which a server's decode call makes once and then reads at every step in place of the
  whole cache."""
  return tuple(KVCache(c.k[:rows, :, :length], c.v[:rows, :, :length]) for c in cache)


def write_back(whole: tuple[KVCache, ...], part: tuple[KVCache, ...], positions: Array) -> tuple[KVCache, ...]:
  """The entries a decode call wrote into its `window` copied into the whole cache: rows
  0..R-1 of `part` at positions (R, T) (the window's positions are the whole cache's). Copying an
  entry the call did not write puts back what was there, so T may cover more steps than ran."""
  rows = jnp.arange(positions.shape[0])[:, None]
  out = []
  for w, p in zip(whole, part):
    k, v = p.k[rows, :, positions], p.v[rows, :, positions]  # (R, T, K, H)
    out.append(w.write_rows(k, v, rows[:, 0], positions))
  return tuple(out)


class RowWriter:
  """A batched prefill's view of the server's cache: its prompts' keys and values go straight
  into the cache, input row r into cache row `rows[r]` (rows (R,)) or each token into its own
  (rows (R, T): several prompts packed in one input row); an index past the last row is padding
  and writes nothing. Nothing is read through it: a prefill attends over its own keys. Satisfies
  `model.LayerCache`."""
  layout = "BKSH"
  write_only = True

  def __init__(self, cache: KVCache, rows: Array):
    self.cache, self.rows = cache, rows

  def write(self, k: Array, v: Array, positions: Array) -> "RowWriter":
    return RowWriter(self.cache.write_rows(k, v, self.rows, positions), self.rows)

  def read(self, dtype):
    raise NotImplementedError("a prefill attends over its own keys, never through the cache")


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
