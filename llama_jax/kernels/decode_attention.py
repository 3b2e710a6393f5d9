"""Ragged decode attention: one query token per row against the KV cache, where each row reads
only the positions it has filled (`lengths`), not the whole buffer. Two kernels:
`ragged_decode_attention` (below) and `rotary_cache_attention`, which also applies rotary and
writes the step's key and value (a block of `decode_block`).

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

from llama_jax.kernels import tiles

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
      # The query heads of a group, padded (masked) for Triton's dot.
      block_h=tiles.dot_rows(group),
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


def supported_head_dim(h: int) -> bool:
  """Whether `rotary_cache_attention` takes heads of `h`: Triton's tiles have power-of-two sides,
  and each half of a head (rotary's pairs) is one."""
  return h >= 32 and h & (h - 1) == 0


def rotary_block(length: int, head_dim: int = 64) -> int:
  """Cache positions a step of the fused kernel's loop reads: measured fastest (benchmarks/
  kernel_sweep.py, H200, TinyLlama's heads of 64) 128 over a cache of 384 positions (5.2 us a
  layer against 6.5 at 64), 256 over 2,048 (18.6 against 23.1 at 128). Heads of more than 64 keep
  128: at 256 positions of 128-wide heads the loop's two stages need ~143 KB of shared memory, more
  than the ~99 KB of sm_86/sm_89 cards (not measured)."""
  return 256 if length > 1024 and head_dim <= 64 else 128


def rotary_cache_attention(qkv: Array, sin: Array, cos: Array, positions: Array, k_cache: Array,
                           v_cache: Array, *, n_heads: int, block_k: int | None = None,
                           num_warps: int = 4, num_stages: int = 2, splits: int = 1,
                           interpret: bool | None = None,
                           name: str = "rotary_cache_attention") -> tuple[Array, Array, Array]:
  """A decode step's attention in one kernel: rotary embeddings, the cache write and attention.

  qkv (B, C, H): each row's one token's projections before rotary, the N query heads, then K keys,
  then K values (C = N + 2K; the engine's fused `wqkv_t`); sin, cos (B, H/2) float32 at each row's
  position; positions (B,) int32; k_cache, v_cache (B, K, S, H), written in place. Program (b, k)
  rotates its group's queries and its key, writes the key and value at positions[b], and attends
  over positions 0..positions[b]: the cached ones, read in blocks of `block_k` (default
  `rotary_block(S, H)`; only the blocks the row has filled), and its own key, which it holds
  already. Returns (attention output (B, N, H), k_cache, v_cache). Arithmetic close to the model's (`model.rotary`,
  `xla_attention`): rotary in float32, keys and queries rounded to the cache dtype, float32 scores
  and softmax statistics; the probabilities are rounded to the cache dtype before they weigh the
  values, block by block and before normalising (flash attention's order), where the model rounds
  the normalised ones. H must be a power of two (Triton's tiles) of at least 32.

  `splits` > 1: the cache's blocks are dealt out in (at most) `splits` contiguous stretches, a
  program for each (row, KV head, stretch), and XLA joins the stretches' softmax statistics after
  (flash decoding). One program a row and KV head streams the row's positions one block after
  another, so the longest row of a batch sets the kernel's time, and one row keeps only K programs
  (SMs) busy; stretches spread a row's positions over more programs for one small join. A stretch
  holding none of a row's filled blocks does nothing; the first writes the cache and counts this
  step's own key."""
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
  b, c, h = qkv.shape
  kv_heads, length = k_cache.shape[1], k_cache.shape[2]
  if c != n_heads + 2 * kv_heads or n_heads % kv_heads:
    raise ValueError(f"qkv {qkv.shape} does not hold {n_heads} query heads and twice {kv_heads} KV heads")
  if not supported_head_dim(h):
    raise ValueError(f"the head dimension {h} must be a power of two of at least 32")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  group = n_heads // kv_heads
  padded = tiles.dot_rows(group)  # the group's query heads, padded (masked) for Triton's dot
  block_k = block_k or rotary_block(length, h)
  half = h // 2
  scale = h ** -0.5
  min_score = jnp.finfo(jnp.float32).min

  blocks = pl.cdiv(length, block_k)
  if not 1 <= splits <= blocks:
    raise ValueError(f"splits must be 1..{blocks} (the cache's blocks of {block_k}), got {splits}")
  per_split = pl.cdiv(blocks, splits)  # blocks a stretch holds (the last may hold fewer)
  splits = pl.cdiv(blocks, per_split)  # and no stretch past the cache (8 blocks asked in 6: 4 of 2)

  def kernel(qkv_ref, sin_ref, cos_ref, pos_ref, k_in, v_in, *refs):
    del k_in, v_in  # the same buffers as k_ref, v_ref (aliased)
    outs, (k_ref, v_ref) = refs[:-2], refs[-2:]  # (o_ref,), or (acc_ref, m_ref, l_ref) with splits
    row, kv = pl.program_id(0), pl.program_id(1)
    stretch = pl.program_id(2) if splits > 1 else 0
    pos = pos_ref[row]
    live = (jnp.arange(padded) < group)[:, None]
    sin, cos = sin_ref[row, :][None, :], cos_ref[row, :][None, :]

    def rotate(first, second):  # the two halves of a head, float32 -> rotated, in the cache dtype
      return ((first * cos - second * sin).astype(k_ref.dtype),
              (second * cos + first * sin).astype(k_ref.dtype))

    def q_half(start):
      return plgpu.load(qkv_ref.at[row, pl.ds(kv * group, padded), pl.ds(start, half)],
                        mask=live, other=0).astype(jnp.float32)

    q1, q2 = rotate(q_half(0), q_half(half))  # (padded, H/2) each
    key_row = n_heads + kv
    k1, k2 = rotate(qkv_ref[row, pl.ds(key_row, 1), pl.ds(0, half)].astype(jnp.float32),
                    qkv_ref[row, pl.ds(key_row, 1), pl.ds(half, half)].astype(jnp.float32))  # (1, H/2)
    v_new = qkv_ref[row, pl.ds(key_row + kv_heads, 1), :]  # (1, H)
    # A position past the cache writes nothing (as the model's scatter, mode="drop"); its row's
    # output is thrown away by the caller, which clamps the positions of rows it still uses.
    inside = (pos < length) & (stretch == 0)  # with splits, the first stretch's program writes
    slot = jnp.minimum(pos, length - 1)
    plgpu.store(k_ref.at[row, kv, pl.ds(slot, 1), pl.ds(0, half)], k1,
                mask=jnp.full((1, half), inside))
    plgpu.store(k_ref.at[row, kv, pl.ds(slot, 1), pl.ds(half, half)], k2,
                mask=jnp.full((1, half), inside))
    plgpu.store(v_ref.at[row, kv, pl.ds(slot, 1), :], v_new.astype(v_ref.dtype),
                mask=jnp.full((1, h), inside))

    filled = jnp.minimum(pos, length)  # cached positions before this step's own

    def body(i, carry):  # cached positions i*BK .. (i+1)*BK - 1, those before this step's
      out, m, l = carry
      keys = pl.ds(i * block_k, block_k)
      # The last block's tail is neither loaded nor counted: a cache of any length.
      cached = (i * block_k + jnp.arange(block_k)) < filled
      load = lambda ref, cols: plgpu.load(ref.at[row, kv, keys, cols], mask=cached[:, None], other=0)
      scores = (tiles.dot(q1, load(k_ref, pl.ds(0, half)), 1)
                + tiles.dot(q2, load(k_ref, pl.ds(half, half)), 1)) * scale
      scores = jnp.where(cached[None, :], scores, min_score)
      m_next = jnp.maximum(m, jnp.max(scores, axis=1))
      correction = jnp.exp(m - m_next)
      p = jnp.exp(scores - m_next[:, None])
      values = load(v_ref, slice(None))
      out = out * correction[:, None] + tiles.dot(p.astype(values.dtype), values)
      return out, m_next, l * correction + jnp.sum(p, axis=1)

    init = (jnp.zeros((padded, h), jnp.float32), jnp.full((padded,), min_score, jnp.float32),
            jnp.zeros((padded,), jnp.float32))
    # This stretch's blocks (with one stretch, all of them), those the row has filled.
    first = stretch * per_split
    out, m, l = jax.lax.fori_loop(
        first, jnp.maximum(first, jnp.minimum(pl.cdiv(filled, block_k), first + per_split)), body, init)
    # This step's own key and value, held in registers (not read back from the cache).
    own = (jnp.sum(q1.astype(jnp.float32) * k1.astype(jnp.float32), axis=1)
           + jnp.sum(q2.astype(jnp.float32) * k2.astype(jnp.float32), axis=1)) * scale
    counted = stretch == 0  # with splits, the first stretch counts it
    m_next = jnp.where(counted, jnp.maximum(m, own), m)
    correction = jnp.exp(m - m_next)
    p_own = jnp.where(counted, jnp.exp(own - m_next), 0.0)
    p_rounded = p_own.astype(v_new.dtype).astype(jnp.float32)
    out = out * correction[:, None] + p_rounded[:, None] * v_new.astype(jnp.float32)
    l = l * correction + p_own
    if splits == 1:
      (o_ref,) = outs
      plgpu.store(o_ref.at[row, pl.ds(kv * group, padded), :], (out / l[:, None]).astype(o_ref.dtype),
                  mask=live)
    else:  # unnormalised, with the statistics XLA joins the stretches by; the group's heads only
      acc_ref, m_ref, l_ref = outs
      heads = pl.ds(0, padded)
      plgpu.store(acc_ref.at[row, kv, stretch, heads, :], out, mask=live)
      plgpu.store(m_ref.at[row, kv, stretch, heads], m_next, mask=live[:, 0])
      plgpu.store(l_ref.at[row, kv, stretch, heads], l, mask=live[:, 0])

  if splits == 1:
    results = (jax.ShapeDtypeStruct((b, n_heads, h), qkv.dtype),)
  else:
    stats = jax.ShapeDtypeStruct((b, kv_heads, splits, group), jnp.float32)
    results = (jax.ShapeDtypeStruct((b, kv_heads, splits, group, h), jnp.float32), stats, stats)
  out_shape = (*results, jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
               jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
  outputs = pl.pallas_call(
      kernel, grid=(b, kv_heads) + ((splits,) if splits > 1 else ()),
      out_shape=out_shape,
      input_output_aliases={4: len(results), 5: len(results) + 1},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=name,
  )(qkv, sin.astype(jnp.float32), cos.astype(jnp.float32), positions.astype(jnp.int32), k_cache, v_cache)
  k_cache, v_cache = outputs[len(results):len(results) + 2]
  if splits == 1:
    return outputs[0], k_cache, v_cache
  acc, m, l = outputs[:3]
  weight = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))  # a stretch with no blocks: m = min, weight 0
  out = jnp.sum(acc * weight[..., None], axis=2) / jnp.sum(l * weight, axis=2)[..., None]
  return out.reshape(b, n_heads, h).astype(qkv.dtype), k_cache, v_cache
