"""The host side of generation: prompts into shape buckets and batches, the engine over them,
tokens (or text) back in the caller's order.

Compilation is once per bucket: batch size, prompt length and the token budget are rounded up to
powers of two; everything else (lengths, limits, EOS ids, seeds, sampling settings) is data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax import sharding
from llama_jax.config import ModelConfig
from llama_jax.generate import engine
from llama_jax.generate.sampling import SamplingParams
from llama_jax.generate.streaming import TextStreamer

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16
STREAM_CHUNK = 8  # decode steps per jitted call while streaming


def bucket(n: int, minimum: int, cap: int) -> int:
  """The smallest power of two >= n (and >= minimum), capped at `cap`."""
  return min(max(minimum, 1 << max(0, n - 1).bit_length()), cap)


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
      raise ValueError(f"prompt {i} has {n} tokens but the model's context is {cfg.max_seq_len} tokens")
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


def _per_prompt(value, n: int, name: str) -> list:
  if isinstance(value, (list, tuple, np.ndarray)):
    if len(value) != n:
      raise ValueError(f"{name}: {len(value)} values for {n} prompts")
    return list(value)
  return [value] * n


def _batch_multiple(mesh: Mesh | None, rules) -> int:
  if mesh is None:
    return 1
  axes = dict(rules).get("batch") or ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def generate_tokens(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, *, temperature=0.0, top_k=0, top_p=1.0, seed: int = 0,
                    eos_ids: Sequence[int] = (), batch_size: int | None = None,
                    mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES,
                    stream: Callable[[list[int]], None] | None = None, return_logits: bool = False):
  """Token-id prompts -> the new tokens of each (up to and including an EOS id when drawn).

  temperature, top_k and top_p are one value for all prompts or one per prompt. `params` are the
  model's stacked parameters or `engine.prepare_params` of them (reused across calls).
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
  n = len(prompts)
  settings = list(zip(_per_prompt(temperature, n, "temperature"), _per_prompt(top_k, n, "top_k"),
                      _per_prompt(top_p, n, "top_p")))
  SamplingParams.stack(settings)  # checks every value before any work
  rules = sharding.as_rules(rules)
  params = engine.prepare_params(cfg, params, mesh, rules)
  batch_size = batch_size or min(n, 64)
  root = jax.random.key(seed)
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  # Similar lengths together, so each batch's prompt bucket is as tight as it can be.
  order = sorted(range(n), key=lambda i: len(prompts[i]))
  results: list[Any] = [None] * n
  for start in range(0, n, batch_size):
    batch = make_batch(cfg, prompts, order[start:start + batch_size], max_new_tokens,
                       _batch_multiple(mesh, rules))
    b = batch.tokens.shape[0]
    pad = b - len(batch.indices)
    sampling = SamplingParams.stack([settings[i] for i in batch.indices] + [(0.0, 0, 1.0)] * pad)
    # Row keys from the prompt's index in the call: its draws do not depend on its batch-mates.
    row_ids = np.asarray(batch.indices + [n + r for r in range(pad)], np.uint32)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(row_ids))
    state = engine.prefill(cfg, params, jnp.asarray(batch.tokens), jnp.asarray(batch.prompt_lengths),
                           jnp.asarray(batch.limits), keys, jax.tree.map(jnp.asarray, sampling), eos,
                           cache_len=batch.cache_len, budget=batch.budget, mesh=mesh, rules=rules,
                           record_logits=return_logits)
    if stream is None:
      state = engine.decode(cfg, params, state, jnp.array(batch.budget, jnp.int32), mesh=mesh, rules=rules)
    else:
      state = _decode_streaming(cfg, params, state, mesh, rules, stream)
    tokens, lengths = np.asarray(state.tokens), np.asarray(state.lengths)
    logits = np.asarray(state.logits) if return_logits else None
    for row, i in enumerate(batch.indices):
      new = tokens[row, :lengths[row]].tolist()
      results[i] = (new, logits[row, :lengths[row]]) if return_logits else new
  return results


def forced_logits(cfg: ModelConfig, params: Any, prompt: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
  """(len(tokens) - 1, V) float32: the logits of each one-token decode step of one row fed `prompt`
  and then `tokens` (the first of which the prefill would draw), whatever the model would have
  drawn: two decode paths (the fused kernels and XLA's blocks, bf16 and float32) compared step by
  step on the same tokens, which free-running decodes stop being after their first near-tie."""
  return forced_batch_logits(cfg, params, [prompt], [tokens])[0]


def forced_batch_logits(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]],
                        tokens: Sequence[Sequence[int]]) -> np.ndarray:
  """`forced_logits` for a batch: row r fed prompts[r] (right-padded to the longest, as the
  engine's prefill takes them), then tokens[r], each row at its own positions; every row has the
  same number of tokens. (R, T - 1, V) float32."""
  if not prompts or len(tokens) != len(prompts) or len({len(t) for t in tokens}) != 1 or len(tokens[0]) < 2:
    raise ValueError("forced_batch_logits takes one token list a prompt, all of one length of at least 2")
  ep = engine.prepare_params(cfg, params)
  rows, steps, longest = len(prompts), len(tokens[0]), max(map(len, prompts))
  # The weights are arguments, not closed over: a jitted closure would bake them into the program
  # as constants (gigabytes for a real model, and a compile that never ends).
  @jax.jit
  def step(ep, token, position, cache):
    x, cache = engine.forward(cfg, ep, token, position, cache)
    return engine.logits_of(cfg, ep, x)[:, 0], cache

  @jax.jit
  def prefill(ep, t, cache):
    return engine.forward(cfg, ep, t, jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape), cache, prefill=True)[1]

  padded = jnp.asarray([list(p) + [0] * (longest - len(p)) for p in prompts])
  cache = prefill(ep, padded, engine.init_cache(cfg, rows, longest + steps))
  starts = jnp.asarray([len(p) for p in prompts])[:, None]
  out = []
  for i in range(steps - 1):  # the steps queue on the device; one copy back at the end
    logits, cache = step(ep, jnp.asarray([[t[i]] for t in tokens]), starts + i, cache)
    out.append(logits)
  return np.asarray(jnp.stack(out, axis=1), np.float32)


def _decode_streaming(cfg, params, state, mesh, rules, stream):
  """Chunks of STREAM_CHUNK steps per jitted call; between calls the host hands out the new
  tokens. The loop body is the same compiled `decode` (the step bound is a traced value), and the
  host syncs once per chunk, not once per token."""
  sent = 0
  while True:
    lengths = int(state.lengths[0])
    if lengths > sent:
      stream(np.asarray(state.tokens[0, sent:lengths]).tolist())
      sent = lengths
    if bool(state.done[0]):
      return state
    until = jnp.array(int(state.steps) + STREAM_CHUNK, jnp.int32)
    state = engine.decode(cfg, params, state, until, mesh=mesh, rules=rules)


def generate(model, prompts, max_new_tokens: int = 128, temperature=0.0, top_p=1.0, top_k=0,
             seed: int = 0, stop_at_eos: bool = True, batch_size: int | None = None,
             stream: Callable | None = None, return_logits: bool = False, mesh: Mesh | None = None):
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
  if not stop_at_eos:
    eos_ids: list[int] = []
  elif tok is not None:
    eos_ids = list(tok.eos_ids)
  else:  # the checkpoint's own ids (a Hugging Face folder's config), else LLaMA's
    eos = (getattr(model, "generation", None) or {}).get("eos_token_id", 2)
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
  ids = tok.encode_batch(list(prompts)) if as_text else [list(p) for p in prompts]
  callback = stream
  if stream is not None and as_text:
    callback = TextStreamer(tok, stream, eos_ids, ids[0])
  out = generate_tokens(model.config, model.params, ids, max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_ids=eos_ids,
                        batch_size=batch_size, mesh=mesh or model.mesh, rules=model.rules,
                        stream=callback, return_logits=return_logits)
  if isinstance(callback, TextStreamer):
    callback.flush()
  new, logits = (zip(*out) if return_logits else (out, None))
  new = list(new)
  if as_text:
    texts = [tok.decode_continuation(p, [t for t in row if t not in eos_ids]) for p, row in zip(ids, new)]
    return (texts, list(logits)) if return_logits else texts
  full = [p + n for p, n in zip(ids, new)]
  return (full, list(logits)) if return_logits else full
