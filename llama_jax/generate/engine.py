"""The generation engine: one prefill pass into a preallocated KV cache, then a jitted while loop.

The shape of Meta's `llama/generation.py` and Gemma's sampler loop (`gemma/text/_sampler_loop.py`):
  prepare_params(...)  the parameters as the engine reads them: cast to the compute dtype once,
                       split into one tree per layer (a layer's weights sliced out of the stacked
                       tensors inside the loop would be copied at every step), and in the decode
                       layout: output-major, the projections that read the same input stacked
                       (`fuse_layer`);
                       quantized weights stay integers, dequantized inside each matmul
                       (`llama_jax.projection`);
  prefill(...)         runs every prompt of the batch in one forward pass, writing the cache, and
                       draws each row's first new token from the logits at its last prompt token;
  decode(...)          a `lax.while_loop` making one token per step for every unfinished row, each
                       row at its own position, until every row has met an EOS id or its token limit
                       (or a step bound, which is how streaming gets tokens out in chunks).

Rows of different prompt lengths share a batch: prompts are right-padded to the bucket length P and
prefilled at positions 0..P-1; a row of length n takes its first token from the logits at n-1 and
decodes at positions n, n+1, ..., overwriting the pad slots before any query can attend to them
(a query attends to slots <= its position). So each row gets what its prompt alone gets.

Everything that varies per request is data: prompt lengths, token limits, EOS ids, PRNG keys and
the sampling settings (per row), so one compilation serves every request of a shape bucket.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llama_jax import model as M
from llama_jax import projection, sharding
from llama_jax.config import ModelConfig
from llama_jax.generate.cache import KVCache, init_cache, shard_cache
from llama_jax.generate.sampling import SamplingParams, sample
from llama_jax.kernels import decode_block

Array = jax.Array

# How many times each jitted function has been traced (Python side effects run only when tracing);
# tests use it to check that new prompts and settings of the same bucket reuse the compiled code.
TRACE_COUNTS: collections.Counter = collections.Counter()


class EngineParams(NamedTuple):
  """The parameters in the compute dtype: `top` without the blocks (embedding, final norm, output
  head), `layers` one tree per block."""
  top: Any
  layers: tuple


class DecodeState(NamedTuple):
  """The while loop's carry. B batch, N the new-token budget, S the cache length, E EOS ids."""
  cache: tuple[KVCache, ...]  # one per layer
  tokens: Array  # (B, N) int32 new tokens; entries at >= lengths are padding
  lengths: Array  # (B,) int32 new tokens so far per row
  prompt_lengths: Array  # (B,) int32
  limits: Array  # (B,) int32 most new tokens per row (0 for padding rows)
  done: Array  # (B,) bool
  keys: Array  # (B,) one PRNG key per row
  sampling: SamplingParams  # (B,) each
  eos_ids: Array  # (E,) int32; -1 entries never match
  steps: Array  # () int32 loop steps since the prefill
  logits: Array | None  # (B, N, V) float32 logits each token was drawn from (tests only)


def fuse_layer(layer: Any) -> Any:
  """One block's parameters in the decode layout: every projection output-major (out, in), with
  the ones that read the same input stacked: `wqkv_t` ((N + 2K) * H, D), `wo_t` (D, N * H), `w13_t`
  (w1 over w3, (2F, D)) and `w2_t` (D, F). A step reads x once and launches one matmul where it
  launched three (attention) or two (feed-forward); output-major, a one-token matrix-vector product
  reduces over each weight's minor axis (XLA turns it into a multiply and a reduction; over the
  major axis that reduction first writes a weight-sized product), and each row of outputs is
  contiguous, as the fused decode kernels read it (`kernels.matvec`). The model's Attention and
  FeedForward take either layout.

  Quantized weights take the same names and layout (`projection.concatenate` joins their integers
  and scales, `projection.transposed` makes the integers output-major). A layer with LoRA adapters
  is left as it is: its adapters apply to each projection on its own."""
  if any(isinstance(w, projection.LoraWeight)
         for w in jax.tree.leaves(layer, is_leaf=projection.is_structured)):
    return layer
  attention, ffn = dict(layer["attention"]), dict(layer["feed_forward"])

  def output_major(w: Any, n_in: int) -> Any:  # (in..., out...) -> (out, in)
    if projection.is_quantized(w):
      return projection.transposed(w)
    fan_in = math.prod(w.shape[:n_in])
    return w.reshape(fan_in, -1).T

  def fuse(module: dict, names: tuple[str, ...], fused: str) -> None:
    weights = [module[k] for k in names]
    if not projection.concatenates(weights, axis=1):
      return
    for k in names:
      del module[k]
    module[fused + "_t"] = output_major(projection.concatenate(weights, axis=1), 1)

  fuse(attention, ("wq", "wk", "wv"), "wqkv")
  fuse(ffn, ("w1", "w3"), "w13")
  attention["wo_t"] = output_major(attention.pop("wo"), 2)  # (N, H, D) -> (D, N*H)
  ffn["w2_t"] = output_major(ffn.pop("w2"), 1)  # (F, D) -> (D, F)
  return {**layer, "attention": attention, "feed_forward": ffn}


def _fusable(mesh: Mesh | None, rules) -> bool:
  # Side by side, the heads of a tensor-parallel split would no longer line up with their shards.
  if mesh is None:
    return True
  table = dict(rules)
  axes = [a for name in (M.HEADS, M.KV_HEADS, M.MLP) for a in jax.tree.leaves(table.get(name))]
  return all(mesh.shape[a] == 1 for a in axes)


def _cast(x, dtype):
  if projection.is_quantized(x):  # integers and float16 scales as they are: the matmul reads them
    return x
  return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x


@functools.partial(jax.jit, static_argnames=("dtype", "fuse"))
def _cast_and_split(params, dtype, fuse: bool) -> EngineParams:
  cast = jax.tree.map(lambda x: _cast(x, dtype), params, is_leaf=projection.is_quantized)
  top = {k: v for k, v in cast.items() if k != "layers"}
  stacked = cast["layers"]["block"]
  n = jax.tree.leaves(stacked)[0].shape[0]
  layers = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))
  return EngineParams(top, tuple(map(fuse_layer, layers)) if fuse else layers)


def prepare_params(cfg: ModelConfig, params: Any, mesh: Mesh | None = None,
                   rules=sharding.DEFAULT_RULES, fuse: bool | None = None) -> EngineParams:
  """Stacked model parameters -> EngineParams, placed on `mesh` by `rules` if given. A copy of the
  weights in the compute dtype (and, unless the mesh splits heads, in the fused decode layout of
  `fuse_layer`), made once per model rather than at every step; quantized weights stay integers
  (output-major in the decode layout), converted inside each matmul."""
  if isinstance(params, EngineParams):
    return params
  if mesh is not None:
    params = jax.device_put(params, projection.shardings_like(
        params, sharding.param_shardings(cfg, mesh, rules)))
  fuse = _fusable(mesh, rules) if fuse is None else fuse
  return _cast_and_split(params, jnp.dtype(cfg.dtype).name, fuse)


def mesh_context(mesh: Mesh | None, rules):
  """The model's activation constraints bound to `mesh` (by `rules`) while tracing; nothing off a mesh."""
  if mesh is None:
    import contextlib
    return contextlib.nullcontext()
  return sharding.activation_rules(mesh, rules)


def decode_kernels(cfg: ModelConfig, mesh: Mesh | None) -> bool:
  """Whether a decode step may run its blocks as fused Pallas kernels (`kernels.decode_block`):
  cfg.decode_kernels "pallas", or "auto" on a GPU; on one device (XLA does not partition a Pallas
  call: over a mesh it would gather the weights and the cache)."""
  one_device = mesh is None or mesh.devices.size == 1
  if cfg.decode_kernels == "pallas" and not one_device:
    raise ValueError(f"decode_kernels 'pallas' runs on one device; this mesh has {mesh.devices.size}")
  if cfg.decode_kernels == "auto":
    return one_device and jax.default_backend() == "gpu"
  return cfg.decode_kernels == "pallas"


def fused_blocks(cfg: ModelConfig, params: EngineParams, rows: int, mesh: Mesh | None = None) -> bool:
  """Whether a decode step of `rows` rows runs every block as fused kernels: `decode_kernels`
  allows it and each layer is one `kernels.decode_block` takes."""
  return decode_kernels(cfg, mesh) and all(decode_block.applies(cfg, layer, rows) for layer in params.layers)


def fused_attention(cfg: ModelConfig, params: EngineParams, mesh: Mesh | None = None) -> bool:
  """Whether a decode step of rows the fused blocks do not take runs XLA's matmuls around the fused
  attention kernel (`kernels.decode_block.batch_block`): `decode_kernels` allows it and each
  layer is one `batch_block` takes."""
  return decode_kernels(cfg, mesh) and all(decode_block.batch_applies(cfg, layer) for layer in params.layers)


def forward(cfg: ModelConfig, params: EngineParams, tokens: Array, positions: Array,
            cache: tuple[KVCache, ...], prefill: bool = False,
            segments: Array | None = None, mesh: Mesh | None = None) -> tuple[Array, tuple[KVCache, ...]]:
  """The blocks over tokens (B, T) at positions (B, T), writing the cache: (last block's output
  (B, T, D), the new cache). A `prefill` starts at position 0 in an empty cache and attends
  causally over its own keys (flash attention where the config says cudnn), within each token's
  segment if `segments` (B, T) are given (prompts packed side by side, each from position 0);
  otherwise each query attends over the cache up to its position. The layers are a Python loop:
  each reads its own weights and cache buffers where they lie. A decode step (T = 1) runs each
  block as five fused kernels where `decode_kernels` allows it and the layers are in the decode
  layout (`kernels.decode_block`), and a step of more rows than those take runs XLA's matmuls
  around the fused attention kernel (`decode_block.batch_block`); `mesh` is the one the step runs
  on, if any."""
  model = M.Transformer(cfg)
  x = model.apply({"params": params.top}, tokens, method="embed")
  rows, length = tokens.shape
  if not prefill and length == 1 and all(isinstance(c, KVCache) for c in cache):
    run = (decode_block.block if fused_blocks(cfg, params, rows, mesh) else
           decode_block.batch_block if fused_attention(cfg, params, mesh) else None)
    if run is not None:
      sin, cos = M.rotary_tables(positions, cfg)
      h, new_cache = x[:, 0], []
      for layer_params, layer_cache in zip(params.layers, cache):
        h, k, v = run(cfg, layer_params, h, positions[:, 0], sin[:, 0, 0], cos[:, 0, 0],
                      layer_cache.k, layer_cache.v)
        new_cache.append(KVCache(k, v))
      return h[:, None], tuple(new_cache)
  mask = None
  if prefill and segments is not None:
    mask = M.attention_mask(positions, positions, segments, segments)
  elif not prefill:
    slots = jnp.arange(cache[0].length)
    mask = M.attention_mask(positions, jnp.broadcast_to(slots, (tokens.shape[0], slots.size)))
  rope = M.rotary_tables(positions, cfg)
  block = M.Block(cfg)
  new_cache = []
  for layer_params, layer_cache in zip(params.layers, cache):
    x, layer_cache = block.apply({"params": layer_params}, x, positions, rope, mask, layer_cache)
    new_cache.append(layer_cache)
  return x, tuple(new_cache)


def logits_of(cfg: ModelConfig, params: EngineParams, x: Array) -> Array:
  """Final norm and output head: (B, T, D) -> float32 (B, T, V)."""
  return M.Transformer(cfg).apply({"params": params.top}, x, method="norm_head")


def row_keys(keys: Array, index: Array) -> Array:
  # Folding in the token's index (not splitting a carried key) makes a token's randomness depend
  # only on the seed, its row and its index: chunked (streamed) and one-shot decoding agree.
  return jax.vmap(jax.random.fold_in)(keys, index)


def _is_eos(tokens: Array, eos_ids: Array) -> Array:
  return jnp.any(tokens[:, None] == eos_ids[None, :], axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "budget", "mesh", "rules",
                                             "record_logits"))
def prefill(cfg: ModelConfig, params: EngineParams, tokens: Array, prompt_lengths: Array,
            limits: Array, keys: Array, sampling: SamplingParams, eos_ids: Array, *, cache_len: int,
            budget: int, mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES,
            record_logits: bool = False) -> DecodeState:
  """tokens (B, P) right-padded prompts -> the decode state holding the filled cache and each
  row's first new token (drawn from the logits at its last prompt position)."""
  TRACE_COUNTS["prefill"] += 1
  b, p = tokens.shape
  with mesh_context(mesh, rules):
    cache = init_cache(cfg, b, cache_len)
    if mesh is not None:
      cache = shard_cache(cache, mesh, rules)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    x, cache = forward(cfg, params, tokens, positions, cache, prefill=True)
    # Only each row's last prompt position needs the (large) output head.
    last = jnp.take_along_axis(x, (prompt_lengths - 1)[:, None, None], axis=1)  # (B, 1, D)
    logits = logits_of(cfg, params, last)[:, 0]  # (B, V)
  first = sample(logits, row_keys(keys, jnp.zeros((b,), jnp.int32)), sampling)
  valid = limits > 0
  new_tokens = jnp.zeros((b, budget), jnp.int32).at[:, 0].set(jnp.where(valid, first, 0))
  lengths = valid.astype(jnp.int32)
  done = ~valid | (lengths >= limits) | _is_eos(first, eos_ids)
  recorded = None
  if record_logits:
    recorded = jnp.zeros((b, budget, cfg.vocab_size), jnp.float32).at[:, 0].set(logits)
  return DecodeState(cache, new_tokens, lengths, prompt_lengths, limits, done, keys, sampling,
                     eos_ids, jnp.zeros((), jnp.int32), recorded)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "rules"), donate_argnames=("state",))
def decode(cfg: ModelConfig, params: EngineParams, state: DecodeState, until: Array, *,
           mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES) -> DecodeState:
  """Draws tokens for every unfinished row until all are done or `until` loop steps have run."""
  TRACE_COUNTS["decode"] += 1
  b, budget = state.tokens.shape
  rows = jnp.arange(b)
  cache_len = state.cache[0].length

  def cond(s: DecodeState):
    return (s.steps < until) & ~jnp.all(s.done)

  def body(s: DecodeState):
    last = s.tokens[rows, jnp.maximum(s.lengths - 1, 0)]  # (B,)
    # The last token sits at prompt_length + length - 1; finished rows are clamped inside the
    # cache (what they compute is thrown away).
    pos = jnp.minimum(s.prompt_lengths + s.lengths - 1, cache_len - 1)
    with mesh_context(mesh, rules):
      x, cache = forward(cfg, params, last[:, None], pos[:, None], s.cache, mesh=mesh)
      logits = logits_of(cfg, params, x)[:, 0]  # (B, V)
    new = sample(logits, row_keys(s.keys, s.lengths), s.sampling)
    active = ~s.done
    at = jnp.minimum(s.lengths, budget - 1)
    tokens = s.tokens.at[rows, at].set(jnp.where(active, new, s.tokens[rows, at]))
    lengths = s.lengths + active.astype(jnp.int32)
    done = s.done | (lengths >= s.limits) | (active & _is_eos(new, s.eos_ids))
    recorded = s.logits
    if recorded is not None:
      recorded = recorded.at[rows, at].set(jnp.where(active[:, None], logits, recorded[rows, at]))
    return s._replace(cache=cache, tokens=tokens, lengths=lengths, done=done, steps=s.steps + 1,
                      logits=recorded)

  return jax.lax.while_loop(cond, body, state)
