"""Ragged decode attention: one query token per row against the KV cache, where each row reads
only the positions it has filled (`lengths`), not the whole buffer.

XLA's attention over a cache reads every position of it and masks the unfilled ones: a server's
decode call over slots of mixed lengths reads, per step, the window of its longest slot for every
row (at 64 TinyLlama rows and a 1,024-position window that is ~1.5 GB a step beside 2.2 GB of
weights). This is flash decoding (split-K: each program reduces one stretch of one row's keys for
one KV head, and a stretch past the row's length is skipped before anything is loaded), through
the Triton-lowered Pallas kernel JAX ships (`jax.experimental.pallas.ops.gpu.decode_attention`),
called on the cache's own (B, K, S, H) layout so nothing is transposed. On a CPU it runs in Pallas'
interpreter (tests only: slow, and exact against `reference`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

SPLIT_LENGTHS = (64, 32, 16)  # positions one program reduces: the longest that divides the cache


def _split_length(length: int) -> int | None:
  return next((s for s in SPLIT_LENGTHS if length % s == 0), None)


def supported(length: int) -> bool:
  """Whether a cache of `length` positions splits into whole stretches for the kernel."""
  return _split_length(length) is not None


def ragged_decode_attention(q: Array, k: Array, v: Array, lengths: Array, *,
                            interpret: bool | None = None) -> Array:
  """q (B, 1, N, H); k, v (B, K, S, H); lengths (B,) in 1..S: row b attends over k[b, :, :lengths[b]].
  Returns (B, 1, N, H) in q's dtype. Grouped-query: the N query heads are K groups of N/K."""
  # Imported where used: Pallas and its Triton lowering load only for a model that runs the kernel.
  from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode  # noqa: PLC0415
  b, t, n, h = q.shape
  kv_heads, length = k.shape[1], k.shape[2]
  if t != 1:
    raise ValueError(f"ragged decode attention takes one query a row, got {t}")
  split = _split_length(length)
  if split is None:
    raise ValueError(f"cache length {length} is not a multiple of {SPLIT_LENGTHS[-1]}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  group = n // kv_heads
  one_head = functools.partial(
      pallas_decode.decode_attn_unbatched, sm_scale=h ** -0.5,
      # Triton's dot takes >= 16 rows, a power of two: the query heads of a group, padded (masked).
      block_h=max(16, 1 << (group - 1).bit_length()),
      block_k=split, k_splits=length // split, num_warps=None, num_stages=2, grid=None,
      interpret=interpret, debug=False, return_residuals=False, normalize_output=True)
  # Over rows (each with its length), then over KV heads (sharing it): (B, K, G, H).
  per_row = jax.vmap(jax.vmap(one_head, in_axes=(0, 0, 0, None, None)), in_axes=(0, 0, 0, None, 0))
  out = per_row(q.reshape(b, kv_heads, group, h), k, v, None, lengths.astype(jnp.int32))
  return out.reshape(b, 1, n, h).astype(q.dtype)


def reference(q: Array, k: Array, v: Array, lengths: Array) -> Array:
  """The same in plain XLA (float32 scores), reading everything and masking."""
  b, _, n, h = q.shape
  kv_heads = k.shape[1]
  qg = q.reshape(b, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("BKGH,BKSH->BKGS", qg, k, preferred_element_type=jnp.float32) * h ** -0.5
  live = jnp.arange(k.shape[2])[None, :] < lengths[:, None]
  scores = jnp.where(live[:, None, None], scores, jnp.finfo(jnp.float32).min)
  out = jnp.einsum("BKGS,BKSH->BKGH", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)
  return out.reshape(b, 1, n, h)
