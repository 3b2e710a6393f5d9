"""The generation engine: one prefill pass into a preallocated KV cache, then a jitted while loop.

The shape of Meta's `llama/generation.py` and Gemma's sampler loop (`gemma/text/_sampler_loop.py`):
  prefill(...)  runs every prompt of the batch in one forward pass, writing the cache, and draws
                each row's first new token from the logits at that row's last prompt token;
  decode(...)   is a `lax.while_loop` making one token per step for the whole batch, each row at its
                own position, until every row has met EOS or its token limit (or a step bound,
                which is how the streaming driver gets tokens out in chunks without leaving jit);
  generate(...) is the host driver: tokenise, bucket, batch, call the two, detokenise.

Rows of different prompt lengths share a batch: prompts are right-padded to the bucket length P and
prefilled at positions 0..P-1; a row of length n takes its first token from the logits at n-1 and
decodes at positions n, n+1, ..., overwriting the pad slots before any query can attend to them
(the cache attends to slots <= the query's position). So each row gets what its prompt alone gets.

Compilation is once per bucket: batch, prompt length and the token budget are rounded up to powers
of two; the actual lengths, limits, EOS id and seed are traced values.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llama_jax import model as M
from llama_jax import sharding
from llama_jax.config import ModelConfig
from llama_jax.samplers import SamplingConfig, sample

Array = jax.Array

# How many times each jitted function has been traced (Python side effects run only when tracing);
# tests use it to check that a new prompt of the same bucket reuses the compiled function.
TRACE_COUNTS: collections.Counter = collections.Counter()

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16
STREAM_CHUNK = 8  # decode steps per jitted call while streaming


class EngineParams(NamedTuple):
  """What prefill and decode run on: the parameters in the compute dtype and, for unrolled layers
  (scan_layers=False), the blocks split into one tree per layer (`model.unstack_layers`), so that
  a step reads each layer's weights where they lie instead of slicing (copying) them out of the
  stacked tensors. `layers` None: the blocks stay stacked in `top` and are scanned."""
  top: Any
  layers: tuple | None


class DecodeState(NamedTuple):
  """The while loop's carry. B batch, N the token budget bucket, S the cache length."""
  cache: M.KVCache  # (L, B, K, S, H) each, or L arrays (B, K, S, H) for per-layer parameters
  tokens: Array  # (B, N) int32 new tokens; entries at >= lengths are padding
  lengths: Array  # (B,) int32 new tokens so far per row
  prompt_lengths: Array  # (B,) int32
  limits: Array  # (B,) int32 most new tokens per row (0 for padding rows)
  done: Array  # (B,) bool
  step: Array  # () int32 loop steps taken: tokens[:, step - 1] is the last one drawn
  keys: Array  # (B,) one PRNG key per row
  eos_id: Array  # () int32; -1: never stop at EOS
  logits: Array | None  # (B, N, V) float32 logits each token was drawn from (debug only)


def bucket(n: int, minimum: int, cap: int) -> int:
  """The smallest power of two >= n (and >= minimum), capped at `cap`."""
  return min(max(minimum, 1 << max(0, n - 1).bit_length()), cap)


def _shard_cache(cache: M.KVCache, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> M.KVCache:
  """The cache split over the mesh like the K/V heads it holds (the third axis from the end)."""
  kv_axes = dict(rules).get(M.KV_HEADS)
  return jax.tree.map(lambda buf: jax.lax.with_sharding_constraint(
      buf, NamedSharding(mesh, P(*[None] * (buf.ndim - 3), kv_axes, None, None))), cache)


def _rules_context(mesh: Mesh | None):
  if mesh is None:
    import contextlib
    return contextlib.nullcontext()
  return sharding.activation_rules(mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "cache_len", "budget", "mesh",
                                             "record_logits"))
def prefill(cfg: ModelConfig, params: EngineParams, tokens: Array, prompt_lengths: Array, limits: Array,
            keys: Array, eos_id: Array, *, sampling: SamplingConfig, cache_len: int, budget: int,
            mesh: Mesh | None = None, record_logits: bool = False) -> DecodeState:
  """tokens (B, P) right-padded prompts -> the decode state holding the filled cache and each
  row's first new token (drawn from the logits at its last prompt position)."""
  TRACE_COUNTS["prefill"] += 1
  b, p = tokens.shape
  with _rules_context(mesh):
    cache = M.init_cache(cfg, b, cache_len, per_layer=params.layers is not None)
    if mesh is not None:
      cache = _shard_cache(cache, mesh)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    model = M.Transformer(cfg)
    hidden, cache = model.apply({"params": params.top}, tokens, positions, cache=cache,
                                layers=params.layers, method="hidden")
    # Only each row's last prompt position needs the (large) output head.
    last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)  # (B, 1, D)
    logits = model.apply({"params": params.top}, last, method="head")[:, 0]  # (B, V)
  first = sample(logits, _step_keys(keys, 0), sampling)
  valid = limits > 0
  tokens_out = jnp.zeros((b, budget), jnp.int32).at[:, 0].set(jnp.where(valid, first, 0))
  lengths = valid.astype(jnp.int32)
  done = ~valid | (lengths >= limits) | (first == eos_id)
  recorded = None
  if record_logits:
    recorded = jnp.zeros((b, budget, cfg.vocab_size), jnp.float32).at[:, 0].set(logits)
  return DecodeState(cache, tokens_out, lengths, prompt_lengths, limits, done,
                     jnp.array(1, jnp.int32), keys, eos_id, recorded)


def _step_keys(keys: Array, step) -> Array:
  # Folding in the step (not splitting a carried key) makes a token's randomness depend only on
  # the seed, its row and its index, so chunked (streaming) and one-shot decoding agree.
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "mesh"), donate_argnames=("state",))
def decode(cfg: ModelConfig, params: EngineParams, state: DecodeState, until: Array, *,
           sampling: SamplingConfig, mesh: Mesh | None = None) -> DecodeState:
  """Draws tokens for every unfinished row until all are done or `until` steps have been taken."""
  TRACE_COUNTS["decode"] += 1
  budget = state.tokens.shape[1]
  cache_len = state.cache.length
  model = M.Transformer(cfg)

  def cond(s: DecodeState):
    return (s.step < jnp.minimum(until, budget)) & ~jnp.all(s.done)

  def body(s: DecodeState):
    last = s.tokens[:, s.step - 1]  # (B,)
    # The last token sits at prompt_length + step - 1; finished rows are clamped inside the cache
    # (what they compute is thrown away).
    pos = jnp.minimum(s.prompt_lengths + s.step - 1, cache_len - 1)
    with _rules_context(mesh):
      logits, cache = model.apply({"params": params.top}, last[:, None], pos[:, None], cache=s.cache,
                                  layers=params.layers)
    logits = logits[:, 0]  # (B, V)
    new = sample(logits, _step_keys(s.keys, s.step), sampling)
    active = ~s.done
    tokens = s.tokens.at[:, s.step].set(jnp.where(active, new, 0))
    lengths = s.lengths + active.astype(jnp.int32)
    done = s.done | (lengths >= s.limits) | (active & (new == s.eos_id))
    recorded = s.logits
    if recorded is not None:
      recorded = recorded.at[:, s.step].set(logits)
    return s._replace(cache=cache, tokens=tokens, lengths=lengths, done=done, step=s.step + 1,
                      logits=recorded)

  return jax.lax.while_loop(cond, body, state)


@dataclasses.dataclass
class Batch:
  """One bucketed batch on the host: which prompts it holds and its padded arrays."""
  indices: list[int]  # positions of its rows in the caller's prompt list
  tokens: np.ndarray  # (B, P) int32, right-padded
  prompt_lengths: np.ndarray  # (B,) int32
  limits: np.ndarray  # (B,) int32
  cache_len: int
  budget: int


def make_batch(cfg: ModelConfig, prompts: Sequence[Sequence[int]], indices: list[int],
               max_new_tokens: int, batch_multiple: int = 1) -> Batch:
  lengths = [len(prompts[i]) for i in indices]
  for i, n in zip(indices, lengths):
    if n == 0:
      raise ValueError(f"prompt {i} is empty")
    if n > cfg.max_seq_len:
      raise ValueError(
          f"prompt {i} has {n} tokens but the model's context is {cfg.max_seq_len} tokens")
  b = bucket(len(indices), 1, 1 << 30)
  b = -(-b // batch_multiple) * batch_multiple
  p = bucket(max(lengths), MIN_PROMPT_BUCKET, cfg.max_seq_len)
  budget = bucket(max_new_tokens, MIN_NEW_TOKENS_BUCKET, 1 << 30)
  cache_len = min(p + budget, cfg.max_seq_len)
  tokens = np.zeros((b, p), np.int32)
  prompt_lengths = np.ones((b,), np.int32)
  limits = np.zeros((b,), np.int32)  # padding rows: no tokens, done from the start
  for row, (i, n) in enumerate(zip(indices, lengths)):
    tokens[row, :n] = prompts[i]
    prompt_lengths[row] = n
    # A row's last drawn token needs no cache slot: n + limit - 1 slots hold prompt and feed-back.
    limits[row] = min(max_new_tokens, cache_len - n + 1)
  return Batch(list(indices), tokens, prompt_lengths, limits, cache_len, budget)


def engine_config(cfg: ModelConfig) -> ModelConfig:
  """The model config the engine runs: XLA attention, since cached attention is a (B, T, S) masked
  attention at per-row positions (the fused cuDNN kernel is for training's causal attention; a
  one-token decode step gains nothing from it)."""
  return cfg if cfg.attention_impl == "xla" else cfg.replace(attention_impl="xla")


@functools.partial(jax.jit, static_argnames="dtype")
def _cast(params, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def cast_params(cfg: ModelConfig, params: Any) -> Any:
  """Parameters stored in a wider dtype than the compute dtype, cast once: otherwise every decode
  step would read the float32 weights and convert them again."""
  leaves = jax.tree.leaves(params)
  if all(leaf.dtype == jnp.dtype(cfg.dtype) for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)):
    return params
  return _cast(params, jnp.dtype(cfg.dtype).name)


def shard_params(cfg: ModelConfig, params: Any, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> Any:
  """Places parameters on the mesh by the model's logical axis names (no-op if already there)."""
  return jax.device_put(params, sharding.model_param_shardings(cfg, mesh, rules))


_unstack_layers = jax.jit(M.unstack_layers)


def engine_params(cfg: ModelConfig, params: Any, mesh: Mesh | None = None) -> EngineParams:
  """The parameters as prefill and decode want them: cast to the compute dtype, placed on the
  mesh if one is given, and split per layer when the layers are unrolled. The split is a copy of
  the blocks made once per call, in exchange for not copying them at every decode step."""
  params = cast_params(cfg, params)
  if mesh is not None:
    params = shard_params(cfg, params, mesh)
  if cfg.scan_layers:
    return EngineParams(params, None)
  return EngineParams(*_unstack_layers(params))


def generate_tokens(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                    eos_id: int | None = None, batch_size: int | None = None,
                    mesh: Mesh | None = None, stream: Callable[[list[int]], None] | None = None,
                    return_logits: bool = False):
  """Token-id prompts -> the new tokens of each (up to and including EOS when drawn).

  With `stream`, one prompt only: the callback gets each chunk of new tokens as it is made.
  With `return_logits`, also the (n_new, V) float32 logits each new token was drawn from."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  prompts = [list(map(int, p)) for p in prompts]
  for i, p in enumerate(prompts):
    if p and (min(p) < 0 or max(p) >= cfg.vocab_size):
      raise ValueError(f"prompt {i}: token ids must lie in [0, {cfg.vocab_size})")
  if stream is not None and len(prompts) != 1:
    raise ValueError("streaming needs exactly one prompt")
  batch_size = batch_size or min(len(prompts), 64)
  cfg = engine_config(cfg)
  params = engine_params(cfg, params, mesh)
  batch_multiple = 1
  if mesh is not None:
    batch_axes = dict(sharding.DEFAULT_RULES).get("batch") or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    batch_multiple = math.prod(mesh.shape[a] for a in batch_axes)
  root = jax.random.key(seed)
  eos = jnp.array(-1 if eos_id is None else eos_id, jnp.int32)
  # Similar lengths together, so each batch's prompt bucket is as tight as it can be.
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  results: list[Any] = [None] * len(prompts)
  for start in range(0, len(order), batch_size):
    batch = make_batch(cfg, prompts, order[start:start + batch_size], max_new_tokens, batch_multiple)
    b = batch.tokens.shape[0]
    # Row keys from the prompt's index in the call: its draws do not depend on its batch-mates.
    row_ids = np.asarray(batch.indices + [len(prompts) + r for r in range(b - len(batch.indices))])
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(row_ids, jnp.uint32))
    state = prefill(cfg, params, jnp.asarray(batch.tokens), jnp.asarray(batch.prompt_lengths),
                    jnp.asarray(batch.limits), keys, eos, sampling=sampling,
                    cache_len=batch.cache_len, budget=batch.budget, mesh=mesh,
                    record_logits=return_logits)
    if stream is None:
      state = decode(cfg, params, state, jnp.array(batch.budget, jnp.int32), sampling=sampling, mesh=mesh)
    else:
      state = _decode_streaming(cfg, params, state, sampling, mesh, stream)
    tokens, lengths = np.asarray(state.tokens), np.asarray(state.lengths)
    logits = np.asarray(state.logits) if return_logits else None
    for row, i in enumerate(batch.indices):
      new = tokens[row, :lengths[row]].tolist()
      results[i] = (new, logits[row, :lengths[row]]) if return_logits else new
  return results


def _decode_streaming(cfg, params, state, sampling, mesh, stream):
  """Chunks of STREAM_CHUNK steps per jitted call; between calls the host prints the new tokens.
  The loop body is the same compiled `decode` (the step bound is a traced value), and the host
  syncs once per chunk, not once per token."""
  sent = 0
  while True:
    lengths = int(state.lengths[0])
    if lengths > sent:
      stream(np.asarray(state.tokens[0, sent:lengths]).tolist())
      sent = lengths
    if bool(state.done[0]) or int(state.step) >= state.tokens.shape[1]:
      return state
    until = jnp.array(int(state.step) + STREAM_CHUNK, jnp.int32)
    state = decode(cfg, params, state, until, sampling=sampling, mesh=mesh)


class TextStreamer:
  """Turns streamed token chunks into printable text deltas. SentencePiece decodes a sequence, not
  a token (a leading "▁" becomes a space only mid-text, bytes combine into characters), so decode
  everything so far and emit what is new, holding back an unfinished UTF-8 character."""

  def __init__(self, tokenizer, write: Callable[[str], None], eos_id: int | None = None,
               prompt_ids: Sequence[int] = ()):
    self.tokenizer, self.write, self.eos_id = tokenizer, write, eos_id
    self.prompt_ids = list(prompt_ids)  # context, so the first word keeps its leading space
    self.ids: list[int] = []
    self.text = ""

  def __call__(self, new_ids: list[int]) -> None:
    self.ids += [i for i in new_ids if i != self.eos_id]
    text = self.tokenizer.decode_continuation(self.prompt_ids, self.ids)
    if text.endswith("\ufffd"):
      return
    if text.startswith(self.text):
      self.write(text[len(self.text):])
    self.text = text

  def flush(self) -> None:
    """At the end: whatever was held back (an incomplete character decodes as U+FFFD)."""
    text = self.tokenizer.decode_continuation(self.prompt_ids, self.ids)
    if text.startswith(self.text) and len(text) > len(self.text):
      self.write(text[len(self.text):])
    self.text = text


def generate(model, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, stop_at_eos: bool = True, batch_size: int | None = None,
             stream: Callable | None = None, mesh: Mesh | None = None, return_logits: bool = False):
  """`Model.generate`: strings in -> continuation strings out (BOS prepended, EOS dropped);
  token-id lists in -> token-id lists out (prompt, then the continuation including EOS if drawn).
  `stream` (one prompt) gets text deltas for a string prompt, new-id chunks for an id prompt."""
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
    raise TypeError("prompts must be a list of strings or a list of token-id lists")
  if not prompts:
    return []
  as_text = all(isinstance(p, str) for p in prompts)
  if not as_text and any(isinstance(p, str) for p in prompts):
    raise TypeError("prompts must be all strings or all token-id lists")
  tok = model.tokenizer
  if as_text and tok is None:
    raise ValueError("string prompts need a tokenizer; this model has none (pass token ids)")
  if tok is not None:
    eos_id = tok.eos_id if stop_at_eos else None
  else:
    eos_id = 2 if stop_at_eos else None  # LLaMA's EOS when no tokenizer says otherwise
  ids = tok.encode_batch(list(prompts)) if as_text else [list(p) for p in prompts]
  callback = stream
  if stream is not None and as_text:
    callback = TextStreamer(tok, stream, eos_id, ids[0])
  sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
  out = generate_tokens(model.config, model.params, ids, max_new_tokens, sampling, seed, eos_id,
                        batch_size, mesh, callback, return_logits)
  if isinstance(callback, TextStreamer):
    callback.flush()
  if return_logits:
    new, logits = zip(*out)
  else:
    new, logits = out, None
  if as_text:
    texts = [tok.decode_continuation(p, [t for t in row if t != eos_id]) for p, row in zip(ids, new)]
    return (texts, list(logits)) if return_logits else texts
  full = [p + n for p, n in zip(ids, new)]
  return (full, list(logits)) if return_logits else full


def benchmark(config, batch_size: int, prompt_len: int, new_tokens: int, repeats: int = 5) -> dict:
  """Times prefill and decode separately on random weights (`python -m llama_jax.bench decode`).
  `config` is the training config (its `model` block). Every row decodes all `new_tokens` (no EOS)."""
  import time
  cfg = engine_config(ModelConfig.from_dict(config.model))
  params = jax.jit(lambda: nn.unbox(M.init_params(cfg, jax.random.key(0))))()
  params = engine_params(cfg, params)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, (batch_size, prompt_len)).tolist()
  batch = make_batch(cfg, prompts, list(range(batch_size)), new_tokens)
  args = (jnp.asarray(batch.tokens), jnp.asarray(batch.prompt_lengths), jnp.asarray(batch.limits),
          jax.random.split(jax.random.key(0), batch.tokens.shape[0]), jnp.array(-1, jnp.int32))
  static = dict(sampling=SamplingConfig(), cache_len=batch.cache_len, budget=batch.budget)
  until = jnp.array(batch.budget, jnp.int32)

  def run():
    t0 = time.perf_counter()
    state = jax.block_until_ready(prefill(cfg, params, *args, **static))
    t1 = time.perf_counter()
    state = jax.block_until_ready(decode(cfg, params, state, until, sampling=static["sampling"]))
    return t1 - t0, time.perf_counter() - t1, state

  t0 = time.perf_counter()
  run()
  compile_s = time.perf_counter() - t0
  prefill_s, decode_s = [], []
  for _ in range(repeats):
    p, d, state = run()
    prefill_s.append(p)
    decode_s.append(d)
  steps = int(state.step) - 1  # the first token comes from the prefill
  assert int(np.min(np.asarray(state.lengths)[:batch_size])) == new_tokens
  p, d = float(np.median(prefill_s)), float(np.median(decode_s))
  return {"batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
          "dtype": cfg.dtype, "cache_len": batch.cache_len,
          "prefill_s": round(p, 5), "prefill_tokens_per_s": round(batch_size * prompt_len / p, 1),
          "decode_s": round(d, 5), "decode_ms_per_step": round(1000 * d / steps, 3),
          "decode_tokens_per_s": round(batch_size * steps / d, 1),
          "total_tokens_per_s": round(batch_size * new_tokens / (p + d), 1),
          "compile_s": round(compile_s, 1)}
