"""Choosing the next token from logits: small pure functions, jittable, batched over rows.

Nucleus sampling is Meta's `sample_top_p` (`llama/generation.py`): sort the probabilities, keep the
smallest prefix whose mass reaches p (a token is dropped when the mass before it already exceeds
p), renormalise, draw. Top-k keeps the k largest logits (ties at the k-th value are kept). When
both are set, top-k is applied first, as Hugging Face's warpers do.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static (part of the compiled function): greedy decoding skips the sort entirely."""
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: all tokens
  top_p: float = 1.0  # 1: all tokens

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def greedy(logits: Array) -> Array:
  """(..., V) -> (...) int32: the most likely token."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def top_k_mask(logits: Array, k: int) -> Array:
  """Logits outside the k largest of each row set to -inf."""
  kth = jax.lax.top_k(logits, k)[0][..., -1:]  # (..., 1)
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_mask(logits: Array, p: float) -> Array:
  """Logits outside the nucleus of mass p set to -inf (Meta's sample_top_p, on logits). (..., V)."""
  return jnp.vectorize(lambda row: _top_p_mask_row(row, p), signature="(v)->(v)")(logits)


def _top_p_mask_row(logits: Array, p: float) -> Array:
  probs = jax.nn.softmax(logits)
  order = jnp.argsort(-probs)  # descending
  sorted_probs = probs[order]
  drop_sorted = jnp.cumsum(sorted_probs) - sorted_probs > p  # the mass before it already exceeds p
  drop = jnp.zeros_like(drop_sorted).at[order].set(drop_sorted)  # back to vocabulary order
  return jnp.where(drop, -jnp.inf, logits)


def sample(logits: Array, keys: Array, config: SamplingConfig) -> Array:
  """(B, V) float logits, (B,) keys -> (B,) int32 tokens. One key per row, so a row's draw does not
  depend on which other rows share its batch."""
  if config.greedy:
    return greedy(logits)
  logits = logits.astype(jnp.float32) / config.temperature
  if config.top_k and config.top_k < logits.shape[-1]:
    logits = top_k_mask(logits, config.top_k)
  if config.top_p < 1.0:
    logits = top_p_mask(logits, config.top_p)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
