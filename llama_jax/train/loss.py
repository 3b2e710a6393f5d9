"""Next-token cross-entropy in float32, masked, as sums so that micro-batches add up exactly."""

from __future__ import annotations

from typing import Callable

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


def chunked_cross_entropy_sums(hidden: jax.Array, head: Callable[[jax.Array], jax.Array],
                               targets: jax.Array, mask: jax.Array, chunk_len: int,
                               z_loss: float = 0.0):
  """`cross_entropy_sums` of `head(hidden)` without the float32 (B, T, V) logits ever existing
  whole: a scan over chunks of `chunk_len` positions, each chunk's logits rematerialised in the
  backward pass instead of kept (for TinyLlama's batch of 8 x 2048, 2.1 GB of logits and as much
  again of their gradient become 0.26 GB at chunk_len 256, for one more pass of the head matmul).

  hidden (B, T, D); head maps (B, C, D) to float32 (B, C, V); T must divide by chunk_len. The
  chunks split the sequence axis, so the batch axis keeps its sharding."""
  b, t = hidden.shape[:2]
  if t % chunk_len:
    raise ValueError(f"model.loss_chunk_len ({chunk_len}) must divide the sequence length ({t})")
  n = t // chunk_len

  def chunks(x):  # (B, T, ...) -> (N, B, C, ...)
    return x.reshape((b, n, chunk_len) + x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def one(x, y, m):  # hidden, targets, mask of one chunk
    return cross_entropy_sums(head(x), y, m, z_loss)

  def body(sums, xs):
    return jax.tree.map(jnp.add, sums, one(*xs)), None

  zeros = (jnp.zeros((), jnp.float32),) * 3
  sums, _ = jax.lax.scan(body, zeros, (chunks(hidden), chunks(targets), chunks(mask.astype(jnp.float32))))
  return sums
