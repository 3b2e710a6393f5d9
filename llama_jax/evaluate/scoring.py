"""Log-likelihoods of token sequences under a causal LM, batched and jitted with length buckets.

One primitive serves perplexity, multiple choice and the lm-eval-harness adapter: a `Request` is a
token sequence and the index of its first scored token; the answer is the sum of log p(token |
everything before it in the sequence) over the scored tokens, and whether every scored token was
the model's greedy (argmax) choice, as lm-eval-harness's `loglikelihood` returns.

Batches are padded on the right (a causal model: padding after a token cannot change its logits)
to a power-of-two length and a fixed number of rows, so one compilation serves a whole bucket.
Sequences are sorted by length first, as lm-eval-harness's `Collator` does, so batches waste
little padding.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from llama_jax.config import ModelConfig
from llama_jax.model import Transformer, rules_in_force

MIN_BUCKET = 16  # the shortest padded length: tiny requests share one compilation


@dataclasses.dataclass(frozen=True)
class Request:
  tokens: Sequence[int]
  start: int  # tokens[start:] are scored; start >= 1 (the first token has nothing to condition on)


@dataclasses.dataclass(frozen=True)
class Score:
  logprob: float  # sum of natural-log probabilities of the scored tokens
  count: int  # number of scored tokens
  greedy: bool  # every scored token was the argmax of its prediction


def _target_logprobs(cfg: ModelConfig, params: Any, inputs: jax.Array, targets: jax.Array):
  """log p(targets[b, t] | inputs[b, :t+1]) in float32, and whether it was the argmax. (B, T) each."""
  return _jitted_target_logprobs(cfg, rules_in_force(), params, inputs, targets)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jitted_target_logprobs(cfg: ModelConfig, rules, params: Any, inputs: jax.Array, targets: jax.Array):
  del rules  # in force while tracing; keys jit's cache (`model.rules_in_force`)
  logits = Transformer(cfg).apply({"params": params}, inputs)  # (B, T, V)
  logits = logits.astype(jnp.float32)
  # log_softmax at the target only: logit - logsumexp, without a second (B, T, V) array.
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (B, T)
  logprobs = target_logits - jax.nn.logsumexp(logits, axis=-1)
  greedy = jnp.argmax(logits, axis=-1) == targets
  return logprobs, greedy


def bucket_length(n: int, cap: int | None = None) -> int:
  """The padded length for a sequence of n inputs: the next power of two (at least MIN_BUCKET),
  but not beyond `cap` when n fits in it (a model's context need not be a power of two)."""
  length = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
  if cap is not None and n <= cap:
    length = min(length, cap)
  return length


def truncate(request: Request, max_inputs: int) -> Request:
  """Keeps the last max_inputs + 1 tokens (max_inputs model inputs), as lm-eval-harness does when
  context plus continuation exceed the model's length; the scored tokens must survive."""
  cut = len(request.tokens) - 1 - max_inputs
  if cut <= 0:
    return request
  if request.start - cut < 1:
    raise ValueError(
        f"{len(request.tokens) - request.start} scored tokens do not fit in a context of {max_inputs}")
  return Request(list(request.tokens[cut:]), request.start - cut)


def score(config: ModelConfig, params: Any, requests: Sequence[Request], batch_size: int = 8,
          max_len: int | None = None, pad_id: int = 0, desc: str = "scoring",
          progress: bool = True) -> list[Score]:
  """Scores every request; results in the order given. Sequences longer than max_len + 1 tokens
  (max_len: at most and by default the model's max_seq_len) lose tokens on the left."""
  if max_len is None:
    max_len = config.max_seq_len
  if not 1 <= max_len <= config.max_seq_len:  # beyond it: positions the model never trained on
    raise ValueError(f"max_len must lie in [1, {config.max_seq_len}] (the model's context, its max_seq_len), "
                     f"got {max_len}")
  requests = [truncate(r, max_len) for r in requests]
  for r in requests:
    if not 1 <= r.start < len(r.tokens):
      raise ValueError(f"request of {len(r.tokens)} tokens cannot score from index {r.start}")
  # Longest first: the first batch shows at once whether the largest shape fits in memory.
  order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
  rows = min(batch_size, 1 << max(0, len(requests) - 1).bit_length())  # no 8 rows for 1 request
  results: list[Score | None] = [None] * len(requests)
  batches = [order[i:i + rows] for i in range(0, len(order), rows)]
  for batch in tqdm(batches, desc=desc, file=sys.stderr, disable=not progress, leave=False):
    length = bucket_length(max(len(requests[i].tokens) - 1 for i in batch), max_len)
    inputs = np.full((rows, length), pad_id, np.int32)
    targets = np.full((rows, length), pad_id, np.int32)
    for row, i in enumerate(batch):
      tokens = np.asarray(requests[i].tokens, np.int32)
      inputs[row, :len(tokens) - 1] = tokens[:-1]
      targets[row, :len(tokens) - 1] = tokens[1:]
    logprobs, greedy = jax.device_get(_target_logprobs(config, params, inputs, targets))
    for row, i in enumerate(batch):
      # Target index j predicts token j + 1, so tokens[start:] are targets[start - 1:len - 1].
      scored = slice(requests[i].start - 1, len(requests[i].tokens) - 1)
      lp = logprobs[row, scored].astype(np.float64)
      results[i] = Score(float(lp.sum()), int(lp.size), bool(greedy[row, scored].all()))
  return results  # type: ignore[return-value]
