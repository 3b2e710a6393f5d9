"""Continuous batching: JetStream's slot-based engine API over the generation engine.

JetStream (`jetstream/engine/engine_api.py`) splits serving into three pure, jitted functions over a
decode state of `max_batch` slots, each slot one request's row of a preallocated KV cache:
  prefill(params, tokens) -> Prefix        one prompt through the blocks into a cache of its own
                                           bucket length, and its first new token;
  insert(prefix, state, slot) -> state     that cache and token copied into a free slot;
  generate(params, state) -> (state, Step) `steps` decode steps for every slot at once, each slot
                                           at its own position, returning the tokens drawn.
The host side (the server's scheduler) decides which slots are live, when a request ends (EOS, its
token limit, a stop string) and when to prefill; the device never waits for it. A slot whose
request has ended keeps decoding garbage until the next insert overwrites it, which costs nothing
extra: the step's shapes are fixed at `max_batch` rows either way.

The blocks, the output head, the cache and the sampler are the engine's (`engine.forward`,
`engine.logits_of`, `cache.KVCache`, `sampling.sample`); only the state around them differs from
`engine.decode`'s static batch. A token's randomness is the engine's too:
fold_in(fold_in(key(seed), row), index), with row 0 for a request of one prompt, so a request with
a seed draws what `generate_tokens(..., seed=seed)` draws for the same prompt alone.

Compilation: `prefill` and `insert` once per prompt-length bucket (powers of two from
`generator.MIN_PROMPT_BUCKET` up to the cache length), `generate` once per row bucket (the leading
slots it runs: 1, 4, 16, ..., max_batch) and once more with the most likely alternatives of each
token (OpenAI's `logprobs`);
`SlotEngine.warmup` compiles them all before the first request.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax import sharding
from llama_jax.config import ModelConfig
from llama_jax.generate import engine
from llama_jax.generate.cache import KVCache, init_cache, shard_cache
from llama_jax.generate.generator import MIN_PROMPT_BUCKET, bucket
from llama_jax.generate.sampling import SamplingParams, sample

Array = jax.Array

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on alternatives per token (chat's `top_logprobs`)


class Prefix(NamedTuple):
  """One prefilled prompt, P its bucket length."""
  cache: tuple[KVCache, ...]  # (1, K, P, H) per layer
  length: Array  # () int32 prompt tokens
  drawn: "Step"  # the first new token, steps = 1, one row
  key: Array  # () the request's row key
  sampling: SamplingParams  # () each


class Slots(NamedTuple):
  """The decode state: B = max_batch slots, S the cache length."""
  cache: tuple[KVCache, ...]  # (B, K, S, H) per layer
  tokens: Array  # (B,) int32 each slot's latest token: the next step's input
  positions: Array  # (B,) int32 where that token sits
  index: Array  # (B,) int32 how many new tokens the slot has drawn: the next one's PRNG index
  keys: Array  # (B,) one PRNG key per slot
  sampling: SamplingParams  # (B,) each


class Step(NamedTuple):
  """What a call hands the host: R rows, T tokens each, L alternatives per token."""
  tokens: Array  # (R, T) int32
  logprobs: Array  # (R, T) float32 log-probability of each token under the model
  top_tokens: Array | None  # (R, T, L) int32 the L most likely tokens, when asked for
  top_logprobs: Array | None  # (R, T, L) float32 their log-probabilities


def max_top_logprobs(cfg: ModelConfig) -> int:
  return min(MAX_TOP_LOGPROBS, cfg.vocab_size)


def row_key(seed: int) -> Array:
  """A one-prompt request's key: row 0 of `generate_tokens`' keys for the same seed."""
  return jax.random.fold_in(jax.random.key(seed), 0)


def _draw(logits: Array, keys: Array, index: Array, sampling: SamplingParams,
          top_logprobs: int) -> Step:
  """(R, V) logits -> one token per row and its log-probabilities (of the model's distribution,
  before temperature and cuts, as OpenAI reports them)."""
  tokens = sample(logits, engine.row_keys(keys, index), sampling)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
  top_values, top_ids = (jax.lax.top_k(logp, top_logprobs) if top_logprobs else (None, None))
  expand = lambda a: None if a is None else a[:, None]
  return Step(tokens[:, None], chosen[:, None], expand(top_ids), expand(top_values))


@functools.partial(jax.jit, static_argnames=("cfg", "max_batch", "cache_len", "mesh", "rules"))
def init_slots(cfg: ModelConfig, *, max_batch: int, cache_len: int, mesh: Mesh | None = None,
               rules=sharding.DEFAULT_RULES) -> Slots:
  """Every slot empty: a zeroed cache, greedy settings, position 0."""
  with engine.mesh_context(mesh, rules):
    cache = init_cache(cfg, max_batch, cache_len)
    if mesh is not None:
      cache = shard_cache(cache, mesh, rules)
  zeros = jnp.zeros((max_batch,), jnp.int32)
  greedy = SamplingParams(jnp.zeros((max_batch,), jnp.float32), zeros, jnp.ones((max_batch,), jnp.float32))
  keys = jax.vmap(row_key)(jnp.arange(max_batch))
  return Slots(cache, zeros, zeros, zeros, keys, greedy)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "rules"))
def prefill(cfg: ModelConfig, params: engine.EngineParams, tokens: Array, length: Array, key: Array,
            sampling: SamplingParams, *, mesh: Mesh | None = None,
            rules=sharding.DEFAULT_RULES) -> Prefix:
  """tokens (P,) one right-padded prompt of `length` tokens -> its cache and first new token,
  drawn from the logits at its last prompt position (what `engine.prefill` does for a batch row),
  with its most likely alternatives (one row: cheap enough to make always)."""
  engine.TRACE_COUNTS["slots.prefill"] += 1
  p = tokens.shape[0]
  with engine.mesh_context(mesh, rules):
    cache = init_cache(cfg, 1, p)
    positions = jnp.arange(p, dtype=jnp.int32)[None]
    x, cache = engine.forward(cfg, params, tokens[None], positions, cache, prefill=True)
    last = jax.lax.dynamic_slice_in_dim(x, length - 1, 1, axis=1)  # (1, 1, D)
    logits = engine.logits_of(cfg, params, last)[:, 0]  # (1, V)
  one = jax.tree.map(lambda a: jnp.asarray(a)[None], sampling)
  drawn = _draw(logits, key[None], jnp.zeros((1,), jnp.int32), one, max_top_logprobs(cfg))
  return Prefix(cache, length, drawn, key, sampling)


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(prefix: Prefix, state: Slots, slot: Array) -> Slots:
  """The prefix's cache into rows `slot` of the state's, positions 0..P-1, and its first token as
  the slot's next input. Whatever a previous request left beyond P is never read: a query attends
  only to slots at or before its position, and each position is written before it is attended."""
  engine.TRACE_COUNTS["slots.insert"] += 1
  cache = tuple(
      KVCache(jax.lax.dynamic_update_slice(s.k, p.k.astype(s.k.dtype), (slot, 0, 0, 0)),
              jax.lax.dynamic_update_slice(s.v, p.v.astype(s.v.dtype), (slot, 0, 0, 0)))
      for s, p in zip(state.cache, prefix.cache))
  put = lambda a, value: a.at[slot].set(value)
  return Slots(cache,
               put(state.tokens, prefix.drawn.tokens[0, 0]),
               put(state.positions, prefix.length),  # the first new token sits right after the prompt
               put(state.index, 1),
               put(state.keys, prefix.key),
               jax.tree.map(put, state.sampling, prefix.sampling))


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "rows", "top_logprobs", "mesh", "rules"),
                   donate_argnames=("state",))
def generate(cfg: ModelConfig, params: engine.EngineParams, state: Slots, *, steps: int = 1,
             rows: int | None = None, top_logprobs: int = 0, mesh: Mesh | None = None,
             rules=sharding.DEFAULT_RULES) -> tuple[Slots, Step]:
  """`steps` decode steps for slots 0..rows-1 (default: all): each feeds its latest token at its
  position and draws the next. Positions are clamped inside the cache; a slot past its end is one
  the host has finished. Returns tokens for those rows only.

  Fewer rows is the light-load case: the host fills the lowest free slot first, so a few requests
  sit in the first slots, and a step reads their part of the cache and computes their rows only
  (the part is copied out and back once per call, not per step)."""
  engine.TRACE_COUNTS["slots.generate"] += 1
  b = state.tokens.shape[0]
  rows = rows or b
  full, state = state, jax.tree.map(lambda a: a[:rows], state) if rows < b else state
  last_slot = state.cache[0].length - 1

  def step(s: Slots, _):
    positions = jnp.minimum(s.positions, last_slot)
    with engine.mesh_context(mesh, rules):
      x, cache = engine.forward(cfg, params, s.tokens[:, None], positions[:, None], s.cache)
      logits = engine.logits_of(cfg, params, x)[:, 0]  # (B, V)
    drawn = _draw(logits, s.keys, s.index, s.sampling, top_logprobs)
    s = s._replace(cache=cache, tokens=drawn.tokens[:, 0], positions=s.positions + 1, index=s.index + 1)
    return s, jax.tree.map(lambda a: a[:, 0], drawn)

  state, drawn = jax.lax.scan(step, state, None, length=steps)
  if rows < b:
    state = jax.tree.map(lambda whole, part: whole.at[:rows].set(part), full, state)
  return state, jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), drawn)  # (rows, steps, ...)


class SlotEngine:
  """The three functions bound to one model, its mesh and the serving shapes; the host's handle.

  `max_batch` slots of `cache_len` positions each (prompt and answer together). Prompts are padded
  to power-of-two buckets; `steps` decode steps run per `generate` call, so the host syncs once
  per `steps` tokens of every slot rather than once per token."""

  def __init__(self, cfg: ModelConfig, params: Any, *, max_batch: int, cache_len: int | None = None,
               steps: int = 8, mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES):
    cache_len = cache_len or cfg.max_seq_len
    if not 0 < cache_len <= cfg.max_seq_len:
      raise ValueError(f"cache length must be in [1, {cfg.max_seq_len}] (the model's context), "
                       f"got {cache_len}")
    if max_batch < 1 or steps < 1:
      raise ValueError(f"max_batch and steps must be >= 1, got {max_batch} and {steps}")
    self.cfg = cfg
    self.rules = sharding.as_rules(rules)
    self.mesh = mesh
    self.params = engine.prepare_params(self.cfg, params, mesh, self.rules)
    self.max_batch, self.cache_len, self.steps = max_batch, cache_len, steps
    self._static = dict(mesh=mesh, rules=self.rules)

  @property
  def prompt_buckets(self) -> list[int]:
    sizes, p = [], bucket(1, MIN_PROMPT_BUCKET, self.cache_len)
    while p not in sizes:
      sizes.append(p)
      p = bucket(2 * p, MIN_PROMPT_BUCKET, self.cache_len)
    return sizes

  def init(self) -> Slots:
    return init_slots(self.cfg, max_batch=self.max_batch, cache_len=self.cache_len, **self._static)

  def prefill(self, prompt: list[int], key: Array, sampling: tuple[float, int, float]) -> Prefix:
    """One prompt of 1..cache_len token ids; sampling is (temperature, top_k, top_p), checked."""
    n = len(prompt)
    if not 0 < n <= self.cache_len:
      raise ValueError(f"a prompt of {n} tokens does not fit the cache of {self.cache_len}")
    tokens = np.zeros((bucket(n, MIN_PROMPT_BUCKET, self.cache_len),), np.int32)
    tokens[:n] = prompt
    settings = jax.tree.map(lambda a: jnp.asarray(a[0]), SamplingParams.stack([sampling]))
    return prefill(self.cfg, self.params, jnp.asarray(tokens), jnp.int32(n), key, settings,
                   **self._static)

  def insert(self, prefix: Prefix, state: Slots, slot: int) -> Slots:
    return insert(prefix, state, jnp.int32(slot))

  @property
  def row_buckets(self) -> list[int]:
    """How many leading slots a `generate` call may run: powers of 4, then all of them."""
    sizes = [r for r in (4 ** i for i in range(16)) if r < self.max_batch]
    return sizes + [self.max_batch]

  def rows_for(self, live_slots: int) -> int:
    """The smallest row bucket that covers slots 0..live_slots-1."""
    return next(r for r in self.row_buckets if r >= live_slots)

  def generate(self, state: Slots, rows: int | None = None, top_logprobs: int = 0) -> tuple[Slots, Step]:
    """Alternatives (`top_logprobs`) are compiled for all slots only: light load with logprobs
    runs every slot."""
    rows = self.max_batch if top_logprobs or rows is None else rows
    return generate(self.cfg, self.params, state, steps=self.steps, rows=rows,
                    top_logprobs=top_logprobs, **self._static)

  def warmup(self) -> None:
    """Compiles every prompt bucket's prefill and insert and every generate variant (each row
    bucket, and all rows with alternatives), so no request waits for a compilation. Its state is
    thrown away."""
    state = self.init()
    for p in self.prompt_buckets:
      state = self.insert(self.prefill([0] * p, row_key(0), (0.0, 0, 1.0)), state, 0)
    for rows in self.row_buckets:
      state, step = self.generate(state, rows=rows)
    state, step = self.generate(state, top_logprobs=max_top_logprobs(self.cfg))
    jax.block_until_ready(step)
