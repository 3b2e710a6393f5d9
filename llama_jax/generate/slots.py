"""Continuous batching: JetStream's slot-based engine API over the generation engine.

JetStream (`jetstream/engine/engine_api.py`) splits serving into three pure, jitted functions over a
decode state of `max_batch` slots, each slot one request's row of a preallocated KV cache:
  prefill(params, tokens) -> Prefix        one prompt through the blocks into a cache of its own
                                           bucket length, and its first new token;
  insert(prefix, state, slot) -> state     that cache and token copied into a free slot;
  generate(params, state) -> (state, Step) decode steps for every slot at once, each slot at its
                                           own position, returning the tokens drawn.
The server uses two changes of that API, for throughput under load:
  prefill_insert(params, state, PrefillCall (R rows of L tokens)) -> (state, Step)
      a round's prompts prefilled together, packed side by side in the call's rows (a segment
      mask keeps each to itself), their keys and values written straight into their slots (no
      cache of their own, no copy), where JetStream prefills one prompt per call: a server at 64
      clients admits a few prompts per round, each a small matmul alone;
  generate(..., count, steps=S, attend=A)
      `count` <= S steps (compiled once per call length the host may ask for, so XLA knows the
      loop's trip count: on an H200 2-3% less time a step than a count that is data, which
      `static_steps=False` gives, one compilation for every length), over the first A positions
      of the cache only (a window
      copied once per call): a step reads the part of the cache its live slots fill, as paged
      attention (vLLM) reads a request's blocks, in place of the whole `max_len` of every slot;
      `greedy=True` where every row is greedy: no sampler branch in the loop, so on a GPU the
      call returns before the device is done and the host queues the next ones behind it.
The host side (the server's scheduler) decides which slots are live, when a request ends (EOS, its
token limit, a stop string), when to prefill, how long a call is and how much of the cache it
needs; the device never waits for it. A slot whose request has ended keeps decoding garbage until
the next insert overwrites it, which costs nothing extra: the step's shapes are fixed at the row
bucket either way.

The blocks, the output head, the cache and the sampler are the engine's (`engine.forward`,
`engine.logits_of`, `cache.KVCache`, `sampling.sample`); only the state around them differs from
`engine.decode`'s static batch. A token's randomness is the engine's too:
fold_in(fold_in(key(seed), row), index), with row 0 for a request of one prompt, so a request with
a seed draws what `generate_tokens(..., seed=seed)` draws for the same prompt alone.

Compilation: `prefill_insert` once per (row bucket, row length: a prompt bucket) whose tokens fit
`prefill_tokens` (prompt buckets: powers of two from `generator.MIN_PROMPT_BUCKET` up to the cache
length; `prefill` and `insert`, which the server no longer uses, once per prompt bucket);
`generate` once per call length (`call_lengths`), greedy or not, and row bucket (the leading
slots it runs: 1, 4, 16, ..., max_batch) and, with XLA's decode attention, for the row buckets of
a quarter of the slots or more, once per attention window (`attend_buckets`: 128, 192, 256, 384,
... up to the cache length; the ragged Pallas attention and the fused decode kernels' read each
slot's own length and have no windows), and once more for all slots with the most likely
alternatives of each token (OpenAI's `logprobs`). `SlotEngine.warmup` compiles the server's before
the first request.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax import sharding
from llama_jax.config import DECODE_ATTENTION_IMPLS, ModelConfig
from llama_jax.generate import engine
from llama_jax.generate.cache import KVCache, RowWriter, init_cache, shard_cache, window, write_back
from llama_jax.generate.generator import MIN_PROMPT_BUCKET, bucket
from llama_jax.generate.sampling import SamplingParams, greedy as most_likely, sample

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


def seed_key(seed: Array) -> Array:
  """`row_key` inside a jitted function, from the seed's low 32 bits (uint32): what `jax.random.key`
  makes of a Python int seed while 64-bit types are off (JAX's default), so a batch of requests
  passes its seeds as one small array instead of one key computation each."""
  return jax.random.fold_in(jax.random.key(seed), 0)


def _draw(logits: Array, keys: Array, index: Array, sampling: SamplingParams,
          top_logprobs: int, greedy: bool = False) -> Step:
  """(R, V) logits -> one token per row and its log-probabilities (of the model's distribution,
  before temperature and cuts, as OpenAI reports them). `greedy`: every row is (the caller knows),
  so the sampler's branches are left out (see `generate`)."""
  tokens = most_likely(logits) if greedy else sample(logits, engine.row_keys(keys, index), sampling)
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


class PrefillCall(NamedTuple):
  """One batched prefill's arguments, made on the host (`SlotEngine.prefill_plan`): R rows of L
  tokens, each row one prompt or (packed) several side by side, then padding; P prompts at most."""
  tokens: np.ndarray  # (R, L) int32
  positions: np.ndarray  # (R, L) int32 each token's position in its own prompt
  segments: np.ndarray | None  # (R, L) int32 which prompt of the row a token is (padding: -1);
  #                              None: one prompt per row, from its start (plain causal attention)
  rows: np.ndarray  # (R, L) int32 the slot each token's keys and values go to (padding: max_batch)
  ends: np.ndarray  # (P,) int32 where each prompt's last token is, as an index into the R*L tokens
  lengths: np.ndarray  # (P,) int32 prompt tokens
  slots: np.ndarray  # (P,) int32 (padding: max_batch)
  seeds: np.ndarray  # (P,) uint32
  sampling: SamplingParams  # (P,) each


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "rules"), donate_argnames=("state",))
def prefill_insert(cfg: ModelConfig, params: engine.EngineParams, state: Slots, call: PrefillCall, *,
                   mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES) -> tuple[Slots, Step]:
  """Prefill and insert for P prompts in one call (`PrefillCall`): each prompt's keys and values go
  straight into its slot's row of the state's cache (positions 0..n-1) and its first new token,
  drawn from the logits at its last prompt token, becomes that slot's next input. Returns the state
  and those first tokens (P rows, 1 token, with their alternatives: P rows are cheap). A slot >=
  max_batch marks padding: computed, never stored. Each prompt gets what `prefill` + `insert` give
  it alone: a token attends only to the tokens of its own prompt (its row, or its segment of a
  packed row) at or before its position, and a stale cache entry past a prompt is written before
  a query can attend to it (see `insert`)."""
  engine.TRACE_COUNTS["slots.prefill_insert"] += 1
  r, length = call.tokens.shape
  keys = jax.vmap(seed_key)(call.seeds)
  with engine.mesh_context(mesh, rules):
    writers = tuple(RowWriter(c, call.rows) for c in state.cache)
    x, writers = engine.forward(cfg, params, call.tokens, call.positions, writers, prefill=True,
                                segments=call.segments)
    last = jnp.take(x.reshape(r * length, x.shape[-1]), call.ends, axis=0)[:, None]  # (P, 1, D)
    logits = engine.logits_of(cfg, params, last)[:, 0]  # (P, V)
  drawn = _draw(logits, keys, jnp.zeros_like(call.lengths), call.sampling, max_top_logprobs(cfg))
  put = lambda a, value: a.at[call.slots].set(value, mode="drop")
  return Slots(tuple(w.cache for w in writers),
               put(state.tokens, drawn.tokens[:, 0]),
               put(state.positions, call.lengths),
               put(state.index, jnp.ones_like(call.lengths)),
               put(state.keys, keys),
               jax.tree.map(put, state.sampling, call.sampling)), drawn


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "rows", "attend", "top_logprobs", "mesh",
                                             "rules", "static_count", "greedy"),
                   donate_argnames=("state",))
def generate(cfg: ModelConfig, params: engine.EngineParams, state: Slots, count: Array, *,
             steps: int = 1, rows: int | None = None, attend: int | None = None, top_logprobs: int = 0,
             mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES,
             static_count: int = 0, greedy: bool = False) -> tuple[Slots, Step]:
  """`count` (<= `steps`, traced) decode steps for slots 0..rows-1 (default: all): each feeds its
  latest token at its position and draws the next. Returns (rows, steps) tokens, of which the
  first `count` columns were drawn (the rest are zeros): one compilation serves every call length.
  `static_count` > 0 replaces `count` by that many steps, known at compile time: a loop whose
  trip count XLA knows, at one compilation per call length (measured on an H200: 2-3% less time a
  step).

  `greedy`: every row the call runs is greedy (the host knows its slots' settings), so each step
  takes the argmax and the sampler's `lax.cond`s are left out. On a GPU a loop with a cond in its
  body is driven from the host (the predicate copied back at every step), so the call holds the
  host until the device is done; a loop of known trip count without one returns at once, and the
  host queues the next calls while this one runs (`benchmarks/host_sync_check.py`).

  Each query attends over cache positions 0..attend-1 only (default: the whole cache): the host
  picks `attend` above every live slot's last position in this call, so a batch of short requests
  reads the part of the cache they fill, not all of it. Fewer rows is the light-load case: the
  host fills the lowest free slot first, so a few requests sit in the first slots and a step
  computes their rows only. Either way the call copies that window of the cache out once, runs
  its steps on the copy and writes back only the entries they wrote. Positions are clamped inside
  the window: a slot past it is one the host has finished (what it draws is thrown away)."""
  engine.TRACE_COUNTS["slots.generate"] += 1
  b = state.tokens.shape[0]
  rows = rows or b
  attend = attend or state.cache[0].length
  windowed = rows < b or attend < state.cache[0].length
  cache = window(state.cache, rows, attend) if windowed else state.cache
  tokens, start, index = state.tokens[:rows], state.positions[:rows], state.index[:rows]
  keys, sampling = state.keys[:rows], jax.tree.map(lambda a: a[:rows], state.sampling)
  zeros = lambda dtype, *shape: jnp.zeros((rows, steps, *shape), dtype)
  out = Step(zeros(jnp.int32), zeros(jnp.float32),
             zeros(jnp.int32, top_logprobs) if top_logprobs else None,
             zeros(jnp.float32, top_logprobs) if top_logprobs else None)

  def step(t, carry):
    cache, tokens, out = carry
    positions = jnp.minimum(start + t, attend - 1)
    with engine.mesh_context(mesh, rules):
      x, cache = engine.forward(cfg, params, tokens[:, None], positions[:, None], cache, mesh=mesh)
      logits = engine.logits_of(cfg, params, x)[:, 0]  # (rows, V)
    drawn = _draw(logits, keys, index + t, sampling, top_logprobs, greedy)
    out = jax.tree.map(lambda o, d: jax.lax.dynamic_update_slice_in_dim(o, d, t, axis=1), out, drawn)
    return cache, drawn.tokens[:, 0], out

  if static_count:
    count = static_count
  cache, tokens, out = jax.lax.fori_loop(0, count, step, (cache, tokens, out))
  if windowed:
    written = jnp.minimum(start[:, None] + jnp.arange(steps)[None], attend - 1)  # (rows, steps)
    cache = write_back(state.cache, cache, written)
  set_rows = lambda whole, part: whole.at[:rows].set(part) if rows < b else part
  return state._replace(cache=cache, tokens=set_rows(state.tokens, tokens),
                        positions=set_rows(state.positions, start + count),
                        index=set_rows(state.index, index + count)), out


def resolve_decode_attention(choice: str, mesh: Mesh | None) -> str:
  """"auto": the ragged kernel (`kernels.decode_attention`: each slot reads its own length, not the
  window of the longest) on one GPU; XLA elsewhere. Over several devices the Pallas call is not
  partitioned by XLA (it would gather the cache), so "auto" keeps XLA there too."""
  one_device = mesh is None or mesh.devices.size == 1
  if choice == "auto":
    return "pallas" if jax.default_backend() == "gpu" and one_device else "xla"
  if choice not in DECODE_ATTENTION_IMPLS:
    raise ValueError(f"decode_attention must be 'auto' or one of {DECODE_ATTENTION_IMPLS}, got {choice!r}")
  if choice == "pallas" and not one_device:
    raise ValueError(f"decode_attention 'pallas' runs on one device; this mesh has {mesh.devices.size}")
  return choice


MIN_ATTEND = 128  # the shortest attention window a decode call compiles for (positions)
# What one more prefill call costs, in prompt tokens, when packing decides between one call with
# more padding and several fuller ones. Measured on an H200 (TinyLlama, `benchmarks/prefill_calls.py`):
# a call's kernels take ~1.3 ms however few its tokens (every weight read once, ~400 kernels),
# the time of ~450 more tokens at ~2.9 us each.
PREFILL_CALL_TOKENS = 448


class SlotEngine:
  """The functions bound to one model, its mesh and the serving shapes; the host's handle. The
  shapes (buckets, windows, call lengths) follow from the settings given here and are worked out
  once: the scheduler asks for them every round.

  `max_batch` slots of `cache_len` positions each (prompt and answer together). Prompts are
  prefilled together, up to `prefill_tokens` (padded) prompt tokens per call, in rows of a
  power-of-two length: packed side by side (`pack_prompts`, `pack`) or one a row (`prefill_into`).
  A `generate` call runs `steps` decode steps by default and up to `max_steps` (the host asks for
  more where it knows no slot will be waiting for them), so the host syncs once per several tokens
  of every slot rather than once per token; the call attends over a window of the cache just long
  enough for its live slots (`attend_buckets`). `decode_kernels` (default: the config's) is
  `model.decode_kernels`: on one GPU, "auto" runs calls of one row through the fused Pallas blocks
  (`kernels.decode_block`) and larger calls through XLA's GEMMs around the fused attention kernel
  (`decode_block.batch_block`; `decode_attention` then applies only with decode_kernels "xla"),
  whose roundings differ from each other's and from XLA's blocks."""

  def __init__(self, cfg: ModelConfig, params: Any, *, max_batch: int, cache_len: int | None = None,
               steps: int = 8, max_steps: int | None = None, prefill_tokens: int = 4096,
               min_attend: int = MIN_ATTEND, mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES,
               decode_attention: str = "auto", static_steps: bool = True, pack_prompts: bool = True,
               decode_kernels: str | None = None):
    cache_len = cache_len or cfg.max_seq_len
    if not 0 < cache_len <= cfg.max_seq_len:
      raise ValueError(f"cache length must be in [1, {cfg.max_seq_len}] (the model's context), "
                       f"got {cache_len}")
    max_steps = max_steps or 4 * steps
    if max_batch < 1 or steps < 1 or max_steps < steps or prefill_tokens < 1:
      raise ValueError(f"max_batch, steps and prefill_tokens must be >= 1 and max_steps >= steps, got "
                       f"{max_batch}, {steps}, {prefill_tokens} and {max_steps}")
    self.cfg = cfg.replace(decode_attention=resolve_decode_attention(decode_attention, mesh),
                           decode_kernels=decode_kernels or cfg.decode_kernels)
    engine.decode_kernels(self.cfg, mesh)  # "pallas" over several devices: refused here, not at a call
    self.rules = sharding.as_rules(rules)
    self.mesh = mesh
    self.params = engine.prepare_params(self.cfg, params, mesh, self.rules)
    self.max_batch, self.cache_len, self.steps, self.max_steps = max_batch, cache_len, steps, max_steps
    self.prefill_tokens, self.min_attend = prefill_tokens, min_attend
    self.static_steps, self.pack_prompts = static_steps, pack_prompts
    self._static = dict(mesh=mesh, rules=self.rules)

  @functools.cached_property
  def prompt_buckets(self) -> list[int]:
    sizes, p = [], bucket(1, MIN_PROMPT_BUCKET, self.cache_len)
    while p not in sizes:
      sizes.append(p)
      p = bucket(2 * p, MIN_PROMPT_BUCKET, self.cache_len)
    return sizes

  def init(self) -> Slots:
    """Empty slots, committed to their devices: a jitted call's outputs are committed (the
    parameters are), and `jit` compiles once for uncommitted and once more for committed arguments
    of the same shapes, so a state that starts uncommitted makes every call after the first
    compile again (what warmup compiled would then not be what serving runs)."""
    state = init_slots(self.cfg, max_batch=self.max_batch, cache_len=self.cache_len, **self._static)
    return jax.device_put(state, jax.tree.map(lambda a: a.sharding, state))

  def prompt_bucket(self, n: int) -> int:
    """The padded length a prompt of n tokens is prefilled at."""
    return bucket(n, MIN_PROMPT_BUCKET, self.cache_len)

  def check_prompt(self, prompt: list[int]) -> int:
    """The prompt's length, checked to fit the cache (ValueError otherwise)."""
    n = len(prompt)
    if not 0 < n <= self.cache_len:
      raise ValueError(f"a prompt of {n} tokens does not fit the cache of {self.cache_len}")
    return n

  def _prompt_array(self, prompt: list[int]) -> tuple[np.ndarray, int]:
    n = self.check_prompt(prompt)
    tokens = np.zeros((self.prompt_bucket(n),), np.int32)
    tokens[:n] = prompt
    return tokens, n

  def prefill(self, prompt: list[int], key: Array, sampling: tuple[float, int, float]) -> Prefix:
    """One prompt of 1..cache_len token ids; sampling is (temperature, top_k, top_p), checked."""
    tokens, n = self._prompt_array(prompt)
    settings = jax.tree.map(lambda a: jnp.asarray(a[0]), SamplingParams.stack([sampling]))
    return prefill(self.cfg, self.params, jnp.asarray(tokens), jnp.int32(n), key, settings,
                   **self._static)

  def insert(self, prefix: Prefix, state: Slots, slot: int) -> Slots:
    return insert(prefix, state, jnp.int32(slot))

  # --- batched prefill

  def prefill_rows(self, length_bucket: int) -> list[int]:
    """How many rows of a length bucket one `prefill_insert` call may take: the row buckets
    whose padded tokens fit `prefill_tokens` (one row always fits)."""
    return [r for r in self.row_buckets if r == 1 or r * length_bucket <= self.prefill_tokens]

  @functools.cached_property
  def prefill_shapes(self) -> list[tuple[int, int]]:
    """(rows, row length) of every batched prefill compiled: row lengths are the prompt buckets."""
    return [(r, p) for p in self.prompt_buckets for r in self.prefill_rows(p)]

  def prompts_per_call(self, rows: int, length: int) -> int:
    """P, the most prompts a prefill call of that shape takes: one a row, or with `pack_prompts` as
    many as fit (at most a prompt a token, and no more than there are slots)."""
    return min(self.max_batch, rows * length) if self.pack_prompts else rows

  def split(self, count: int, length_bucket: int) -> list[int]:
    """`count` prompts of one length bucket, one a row, as row buckets of calls: a bucket above
    what is left when its padding rows are no more than the prompts it carries (at most twice the
    compute), else the largest bucket that they fill."""
    sizes, calls = self.prefill_rows(length_bucket), []
    while count > 0:
      up = next((r for r in sizes if r >= count), sizes[-1])
      if up > count and up - count > count:
        up = max(r for r in sizes if r <= count)
      calls.append(up)
      count -= min(up, count)
    return calls

  def _first_fit(self, order: list[int], lengths: list[int], shape: tuple[int, int]):
    """Prompts (indices into `lengths`, longest first) into the rows of one call, each into the
    first row with room: (the rows' prompts, the prompts left over)."""
    r, length = shape
    rows, room, left = [[] for _ in range(r)], [length] * r, []
    room_for = self.prompts_per_call(r, length)
    for i in order:
      row = next((j for j in range(r) if lengths[i] <= room[j]), None)
      if row is None or room_for == 0:
        left.append(i)
        continue
      rows[row].append(i)
      room[row] -= lengths[i]
      room_for -= 1
    return rows, left

  def pack(self, lengths: list[int]) -> list[tuple[tuple[int, int], list[list[int]]]]:
    """Prompts of these lengths as prefill calls: (the call's shape, each row's prompts). With
    `pack_prompts`, whole prompts side by side in the rows of the compiled shapes (first fit,
    longest first), in the calls of least padded tokens, counting `PREFILL_CALL_TOKENS` a call:
    the smallest call that takes them all, or the largest call they fill and then the rest.
    Without: one prompt a row, calls by length bucket (`split`)."""
    if self.pack_prompts:
      return self._pack(sorted(range(len(lengths)), key=lambda i: -lengths[i]), lengths)[1]
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
      groups.setdefault(self.prompt_bucket(n), []).append(i)
    calls = []
    for p, members in groups.items():
      for r in self.split(len(members), p):
        chosen, members = members[:r], members[r:]
        calls.append(((r, p), [[i] for i in chosen] + [[] for _ in range(r - len(chosen))]))
    return calls

  def _pack(self, left: list[int], lengths: list[int]) -> tuple[int, list]:
    """(cost in tokens, calls) of packing the prompts `left` (longest first)."""
    if not left:
      return 0, []
    size = lambda shape: shape[0] * shape[1]
    fitting = sorted((shape for shape in self.prefill_shapes if shape[1] >= lengths[left[0]]),
                     key=lambda shape: (size(shape), shape[1]))
    total = sum(lengths[i] for i in left)
    options, whole = [], None
    for shape in fitting:  # the smallest call that takes them all
      if size(shape) < total or self.prompts_per_call(*shape) < len(left):
        continue
      rows, rest = self._first_fit(left, lengths, shape)
      if not rest:
        whole = shape
        options.append((size(shape) + PREFILL_CALL_TOKENS, [(shape, rows)]))
        break
    # The largest call they fill (of that size, the shortest rows: less attention), then the rest.
    under = [shape for shape in fitting if size(shape) <= total]
    first = min(under, key=lambda s: (-size(s), s[1])) if under else None if whole else fitting[-1]
    if first is not None and first != whole:
      rows, rest = self._first_fit(left, lengths, first)
      cost, calls = self._pack(rest, lengths)
      options.append((size(first) + PREFILL_CALL_TOKENS + cost, [(first, rows)] + calls))
    return min(options, key=lambda option: option[0])

  def prefill_into(self, state: Slots, prompts: list[list[int]], seeds: list[int],
                   sampling: list[tuple[float, int, float]], slots: list[int]
                   ) -> tuple[Slots, list[tuple[list[int], Step]]]:
    """Prompts into their slots, prefilled together (`pack`). Returns the state and, per call,
    which of the prompts (indices into the lists) it holds, in order, beside the first tokens it
    drew (`Step`, one row per prompt in that order, then padding). A seed is any int (its low 32
    bits count, as `row_key`'s); sampling settings are checked."""
    calls = []
    for chosen, args in self.prefill_plan(prompts, seeds, sampling, slots):
      state, drawn = self.prefill_call(state, args)
      calls.append((chosen, drawn))
    return state, calls

  def prefill_call(self, state: Slots, call: PrefillCall) -> tuple[Slots, Step]:
    """One call of a `prefill_plan`: (the state, the first tokens it drew)."""
    return prefill_insert(self.cfg, self.params, state, call, **self._static)

  def prefill_plan(self, prompts, seeds, sampling, slots) -> list[tuple[list[int], PrefillCall]]:
    """`prefill_into`'s calls, made on the host alone: (which of the prompts it holds, its
    `PrefillCall`) per call. Checks the prompts and sampling settings."""
    SamplingParams.stack(sampling)
    plan = []
    for (r, length), rows in self.pack([self.check_prompt(p) for p in prompts]):
      chosen = [i for row in rows for i in row]
      tokens, positions, segments, where = self._empty_rows(r, length)
      ends = []
      for row, members in enumerate(rows):
        at = 0
        for i in members:
          n = len(prompts[i])
          tokens[row, at:at + n] = prompts[i]
          positions[row, at:at + n] = np.arange(n)
          segments[row, at:at + n] = len(ends)
          where[row, at:at + n] = slots[i]
          ends.append(row * length + at + n - 1)
          at += n
        positions[row, at:] = np.arange(length - at)  # padding: a segment of its own, from 0
      pad = self.prompts_per_call(r, length) - len(chosen)
      plan.append((chosen, PrefillCall(
          tokens, positions, segments if self.pack_prompts else None, where,
          np.asarray(ends + [0] * pad, np.int32),
          np.asarray([len(prompts[i]) for i in chosen] + [1] * pad, np.int32),
          np.asarray([slots[i] for i in chosen] + [self.max_batch] * pad, np.int32),
          np.asarray([seeds[i] & 0xFFFFFFFF for i in chosen] + [0] * pad, np.uint32),
          SamplingParams.stack([sampling[i] for i in chosen] + [(0.0, 0, 1.0)] * pad))))
    return plan

  def empty_prefill(self, r: int, length: int) -> PrefillCall:
    """A prefill call of that shape with nothing in it (every token and prompt padding, which
    costs what prompts do): what warmup compiles and benchmarks time."""
    tokens, positions, segments, where = self._empty_rows(r, length)
    positions[:] = np.arange(length)
    n = self.prompts_per_call(r, length)
    return PrefillCall(tokens, positions, segments if self.pack_prompts else None, where,
                       np.zeros((n,), np.int32), np.ones((n,), np.int32),
                       np.full((n,), self.max_batch, np.int32), np.zeros((n,), np.uint32),
                       SamplingParams.stack([(0.0, 0, 1.0)] * n))

  def _empty_rows(self, r: int, length: int):
    """(tokens, positions, segments, rows) of a prefill call of that shape holding nothing yet."""
    return (np.zeros((r, length), np.int32), np.zeros((r, length), np.int32),
            np.full((r, length), -1, np.int32), np.full((r, length), self.max_batch, np.int32))

  # --- decode

  @functools.cached_property
  def row_buckets(self) -> list[int]:
    """How many leading slots a `generate` call may run: powers of 4, then all of them."""
    sizes = [r for r in (4 ** i for i in range(16)) if r < self.max_batch]
    return sizes + [self.max_batch]

  def rows_for(self, live_slots: int) -> int:
    """The smallest row bucket that covers slots 0..live_slots-1."""
    return next(r for r in self.row_buckets if r >= live_slots)

  @functools.cached_property
  def attend_buckets(self) -> list[int]:
    """Attention windows a decode call may read: powers of two from `min_attend` and the points
    halfway between them (128, 192, 256, 384, ...), then the whole cache; a window at most 1.5x
    what the live slots need."""
    sizes, p = set(), 1
    while p < self.cache_len:
      sizes.update(w for w in (p, p + p // 2) if self.min_attend <= w < self.cache_len)
      p *= 2
    return sorted(sizes) + [self.cache_len]

  def windowed(self, rows: int) -> bool:
    """Whether calls of `rows` slots have a window per attend bucket (else the whole cache): only
    where the cache the rows read is a large part of a step's memory traffic (a quarter of the slots
    or more); fewer rows mostly read the weights, and each window is one more compilation. Never
    where each slot reads its own length of the cache whatever the window (the ragged Pallas
    attention, or the fused decode kernels' attention, `engine.fused_attention`): windows would
    only add programs (at the benchmark's 64 slots of 1,024 positions, 72 of its 121), and calls
    of all the slots no copy at all (fewer rows still copy theirs out)."""
    return not self.reads_own_lengths and rows * 4 >= self.max_batch

  @functools.cached_property
  def reads_own_lengths(self) -> bool:
    """Whether a decode call's attention reads each slot's filled positions only."""
    return self.cfg.decode_attention == "pallas" or engine.fused_attention(self.cfg, self.params, self.mesh)

  @functools.cached_property
  def call_lengths(self) -> list[int]:
    """The decode steps a call is compiled for with `static_steps`: `steps` doubled up to
    `max_steps` (the lengths the scheduler asks for); any other length runs a loop whose trip
    count is data (compiled on first use)."""
    sizes, s = [], self.steps
    while s <= self.max_steps:
      sizes.append(s)
      s *= 2
    return sizes

  @functools.cached_property
  def generate_shapes(self) -> list[tuple[int, int, int, int, bool]]:
    """(rows, attend, top_logprobs, steps, greedy) of every `generate` compiled; steps 0: any
    length (a data trip count, without `static_steps`). Each shape twice, for greedy rows only and
    for any, but alternatives only for any."""
    lengths = self.call_lengths if self.static_steps else [0]
    shapes = [(r, a, 0, greedy) for r in self.row_buckets
              for a in (self.attend_buckets if self.windowed(r) else [self.cache_len])
              for greedy in (False, True)]
    shapes.append((self.max_batch, self.cache_len, max_top_logprobs(self.cfg), False))
    return [(r, a, top, n, greedy) for r, a, top, greedy in shapes for n in lengths]

  def generate(self, state: Slots, rows: int | None = None, top_logprobs: int = 0,
               steps: int | None = None, need: int | None = None, greedy: bool = False) -> tuple[Slots, Step]:
    """`steps` decode steps (default `self.steps`, at most `max_steps`) for the leading `rows`
    slots. `need`: one past the last position any live slot attends to in this call (default: the
    whole cache); the call reads the smallest window that covers it. Returns `max_steps` tokens per
    row, of which the first `steps` were drawn. Alternatives (`top_logprobs`) are compiled for all
    slots and the whole cache only: light load with logprobs runs every slot. `greedy`: every
    live slot's temperature is 0 (a call that does not block the host; see `generate`); ignored
    with alternatives."""
    count, options = self._generate_args(rows, top_logprobs, steps, need, greedy)
    return generate(self.cfg, self.params, state, count, **options)

  def _generate_args(self, rows, top_logprobs, steps, need, greedy=False) -> tuple[np.ndarray, dict]:
    """(count, the static options) of `generate`'s call."""
    steps = steps or self.steps
    if not 0 < steps <= self.max_steps:
      raise ValueError(f"steps must be in [1, {self.max_steps}], got {steps}")
    rows = self.max_batch if top_logprobs or rows is None else rows
    attend = self.attend_for(rows, top_logprobs, need)
    static_count = steps if self.static_steps and steps in self.call_lengths else 0
    return np.int32(steps), dict(steps=self.max_steps, rows=rows, attend=attend, top_logprobs=top_logprobs,
                                 static_count=static_count, greedy=bool(greedy and not top_logprobs),
                                 **self._static)

  def attend_for(self, rows: int, top_logprobs: int, need: int | None) -> int:
    """The attention window a `generate` call of `rows` slots reads for `need` positions."""
    if need is None or top_logprobs or not self.windowed(rows):
      return self.cache_len
    return next(a for a in self.attend_buckets if a >= min(need, self.cache_len))

  def warmup(self, threads: int | None = None) -> None:
    """Compiles what a request's way through the server can take: every batched prefill shape
    and every generate variant (each row bucket and window, and all rows with alternatives), so no
    request waits for a compilation. (The one-prompt `prefill` and `insert`, which the server does
    not use, compile when first called.) XLA compiles `threads` programs at a time (default: up to
    8, one per CPU): a program's tracing holds the GIL, its compilation and autotuning do not. The
    compiled programs are the ones later calls use (same arguments: `jit`'s cache is shared
    between `lower().compile()` and calls); each is then called once, and its state thrown away."""
    state = self.init()
    empty = [self.empty_prefill(r, p) for r, p in self.prefill_shapes]
    programs = [functools.partial(prefill_insert.lower, self.cfg, self.params, state, call, **self._static)
                for call in empty]
    for rows, attend, top, steps, greedy in self.generate_shapes:
      count, options = self._generate_args(rows, top, steps or None, attend, greedy)
      programs.append(functools.partial(generate.lower, self.cfg, self.params, state, count, **options))
    threads = threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="llama_jax-warmup") as pool:
      list(pool.map(lambda lower: lower().compile(), programs))  # (raises what a compilation raised)
    for call in empty:
      state, _ = self.prefill_call(state, call)
    for rows, attend, top, steps, greedy in self.generate_shapes:
      state, step = self.generate(state, rows=rows, top_logprobs=top, steps=steps or None, need=attend,
                                  greedy=greedy)
    jax.block_until_ready(step)
