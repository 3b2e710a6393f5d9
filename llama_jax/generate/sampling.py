"""Choosing the next token from logits: small pure functions, jittable, with per-row parameters.

Temperature, top-k and top-p are data (one value per row), not compile-time constants: one compiled
step serves every setting and a batch can mix them (greedy rows beside sampled ones), which a server
whose requests join a running batch needs. The order is Hugging Face's warpers': divide by the
temperature, keep the k largest logits (ties with the k-th kept), then the nucleus: Meta's
`sample_top_p` (`llama/generation.py`) keeps the smallest prefix of the sorted probabilities whose
mass reaches p (a token is dropped when the mass before it already exceeds p). A temperature of 0
is greedy (argmax, no randomness), and so is one so small that dividing by it overflows float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
MAX_TEMPERATURE = float(np.finfo(np.float32).max)  # rows hold their temperature in float32


def check(temperature: float, top_k: int, top_p: float) -> None:
  """Host-side range checks, one clear line each."""
  if not np.isfinite(temperature) or temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > MAX_TEMPERATURE:  # rows keep it in float32: inf would make NaNs
    raise ValueError(f"temperature must be at most {MAX_TEMPERATURE:.3g}, got {temperature}")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0, got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _top_k_array(values) -> np.ndarray:
  """top_k values as int32. Any int is a valid top_k, and one of the vocabulary's size or more
  cuts nothing: past int32's range it becomes 0, which means just that."""
  return np.asarray([0 if int(k) > np.iinfo(np.int32).max else int(k) for k in values], np.int32)


class SamplingParams(NamedTuple):
  """Per-row sampling settings, each (B,)."""
  temperature: Array  # float32; 0: greedy
  top_k: Array  # int32; 0: no cut
  top_p: Array  # float32; 1: no cut

  @classmethod
  def make(cls, batch_size: int, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> "SamplingParams":
    """The same settings for every row, checked."""
    check(temperature, top_k, top_p)
    return cls(np.full((batch_size,), temperature, np.float32), _top_k_array([top_k] * batch_size),
               np.full((batch_size,), top_p, np.float32))

  @classmethod
  def stack(cls, rows: list[tuple[float, int, float]]) -> "SamplingParams":
    """One (temperature, top_k, top_p) per row, checked."""
    for row in rows:
      check(*row)
    t, k, p = zip(*rows) if rows else ((), (), ())
    return cls(np.asarray(t, np.float32), _top_k_array(k), np.asarray(p, np.float32))


def greedy(logits: Array) -> Array:
  """(..., V) -> (...) int32: the most likely token."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def top_k_top_p_mask(logits: Array, top_k: Array, top_p: Array) -> Array:
  """(B, V) logits with everything outside each row's top-k and nucleus set to -inf.

  One descending sort per row serves both cuts: the k-th largest value bounds top-k, and the
  nucleus is the sorted prefix whose mass before each entry is at most p (over the top-k survivors,
  ties with the k-th included, renormalised). Both become a threshold on the logit, so tokens tied
  with the last kept one stay. A p of 1 is no nucleus: float32's cumulative sum can pass 1 before
  the last survivor, which would cut it."""
  v = logits.shape[-1]
  ranked = -jnp.sort(-logits, axis=-1)  # (B, V) descending
  k = jnp.where((top_k > 0) & (top_k < v), top_k, v)  # (B,)
  kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)  # (B, 1)
  ranked = jnp.where(ranked >= kth, ranked, -jnp.inf)  # by value, not position: ties stay in the nucleus
  probs = jax.nn.softmax(ranked, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = ((mass_before <= top_p[:, None]) | (top_p[:, None] >= 1)) & (ranked > -jnp.inf)
  keep = keep.at[:, 0].set(True)  # the most likely token always stays
  threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)  # (B, 1)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits: Array, keys: Array, params: SamplingParams) -> Array:
  """(B, V) logits, (B,) PRNG keys -> (B,) int32 tokens. One key per row, so a row's draw does not
  depend on which other rows share its batch. A batch of greedy rows never sorts or draws."""
  logits = logits.astype(jnp.float32)
  best = greedy(logits)
  sampled_rows = params.temperature > 0

  def draw(_):
    scaled = logits / jnp.where(sampled_rows, params.temperature, 1.0)[:, None]
    # A temperature so small that a finite logit over it overflows (1e-37 with a logit of 40), or a
    # subnormal one that the device flushes to 0 in the division, is greedy: the limit as the
    # temperature goes to 0. Drawn, its infinities would tie (the first one wins) and the nucleus's
    # softmax of them is NaN. Greedy is what a draw would give: over such a temperature, logits
    # 1e-30 of the largest one's size apart are 3e8 apart, the draw's noise a few tens.
    overflowed = ~jnp.isfinite(jnp.max(scaled, axis=-1))  # very negative logits may go to -inf: harmless
    sampled = sampled_rows & ~overflowed
    scaled = jnp.where(sampled[:, None], scaled, logits)  # no infinities into the cuts' sort
    cut = ((params.top_k > 0) & (params.top_k < logits.shape[-1])) | (params.top_p < 1)  # k >= V: none
    scaled = jax.lax.cond(jnp.any(cut & sampled),
                          lambda x: top_k_top_p_mask(x, params.top_k, params.top_p), lambda x: x, scaled)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(sampled, drawn, best)

  return jax.lax.cond(jnp.any(sampled_rows), draw, lambda _: best, None)
