"""Next-token cross-entropy in float32, masked, as sums so that micro-batches add up exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float = 0.0):
  """(sum of masked NLL [+ z-loss], sum of mask, sum of masked NLL without z-loss).

  logits (B, T, V) float32; targets (B, T) int; mask (B, T) float. The z-loss (PaLM, Chowdhery et
  al. 2022) penalises log Z² to keep the softmax normaliser near 1; it is off by default.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = (log_z - target_logit) * mask
  objective = nll + z_loss * jnp.square(log_z) * mask if z_loss else nll
  return jnp.sum(objective), jnp.sum(mask), jnp.sum(nll)
