"""The objectives of preference training and RLHF, as pure functions of log-probabilities, rewards
and values: no model, no data, each a few lines that a test holds against the paper's equation.

  reward_loss          Bradley-Terry: -log σ(r_chosen - r_rejected) (InstructGPT, Ouyang et al.
                       2022, eq. 1)
  dpo_loss             DPO (Rafailov et al. 2023, eq. 7) and IPO (Azar et al. 2023, eq. 17)
  kl_shaped_rewards    InstructGPT's per-token reward (Ouyang et al. 2022, eq. 2; Ziegler et al.
                       2019): -β (log π(y_t) - log π_ref(y_t)) at every response token, plus the
                       reward model's score at the last one
  gae                  generalised advantage estimation (Schulman et al. 2016, eq. 16)
  masked_whiten        advantages to zero mean and unit variance over the response tokens
  clipped_policy_loss  PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated
  value_loss           the value loss with the value clipped near the rollout's, as OpenAI's
                       `lm-human-preferences` and TRL do
  group_advantages     GRPO's (Shao et al. 2024, DeepSeekMath §4.1.2): each sample's reward against
                       its group's mean (and standard deviation)
  k3_kl                Schulman's unbiased, non-negative KL estimator that GRPO puts in its loss
  token_weights        how a minibatch's per-token losses are averaged: every response token alike
                       (TRL's PPO, DAPO), or each answer's tokens first, then the answers (GRPO's
                       eq. 3)

Log-probabilities are sums over a sequence's response tokens (DPO, rewards) or per token (PPO).
Losses come back per pair or per token, not averaged: the caller sums them, so micro-batches add up
(`train.step.gradient_step`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

DPO_LOSSES = ("sigmoid", "ipo")
LOSS_TYPES = ("token", "sequence")


def reward_loss(chosen_rewards: Array, rejected_rewards: Array) -> Array:
  """Per pair: -log σ(r_c - r_r), the negative log-likelihood of the preference under the
  Bradley-Terry model."""
  return -jax.nn.log_sigmoid(chosen_rewards - rejected_rewards)


def dpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array, ref_chosen_logps: Array,
             ref_rejected_logps: Array, beta: float, loss_type: str = "sigmoid"):
  """(loss, chosen reward, rejected reward), each per pair. The implicit rewards are
  β (log π(y|x) - log π_ref(y|x)); "sigmoid" is DPO's -log σ(r_c - r_r), "ipo" is IPO's squared
  distance of the log-ratio margin h = (r_c - r_r) / β from 1 / (2β)."""
  chosen = beta * (policy_chosen_logps - ref_chosen_logps)
  rejected = beta * (policy_rejected_logps - ref_rejected_logps)
  if loss_type == "sigmoid":
    loss = -jax.nn.log_sigmoid(chosen - rejected)
  elif loss_type == "ipo":
    loss = jnp.square((chosen - rejected) / beta - 1.0 / (2.0 * beta))
  else:
    raise ValueError(f"dpo.loss must be one of {DPO_LOSSES}, got {loss_type!r}")
  return loss, chosen, rejected


def kl_shaped_rewards(logps: Array, ref_logps: Array, scores: Array, mask: Array, kl_coef: float):
  """(rewards, kl), each (B, N) over response tokens (left-aligned, mask 1 on the response): the
  per-token KL estimate log π - log π_ref times -kl_coef, and each row's score added at its last
  response token."""
  kl = (logps - ref_logps) * mask
  last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)  # (B,)
  at_last = jax.nn.one_hot(last, mask.shape[1], dtype=scores.dtype) * (jnp.sum(mask, axis=1) > 0)[:, None]
  return -kl_coef * kl + scores[:, None] * at_last, kl


def gae(rewards: Array, values: Array, mask: Array, gamma: float, lam: float):
  """(advantages, returns), each (B, N): A_t = Σ_l (γλ)^l δ_{t+l} with δ_t = r_t + γ V_{t+1} - V_t,
  over a response that ends the episode (V after its last token is 0). Rows are left-aligned:
  mask is 1 on the first n_b tokens."""
  values = values * mask
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = (rewards + gamma * next_values - values) * mask

  def back(carry, x):  # from the last token to the first
    delta, m = x
    advantage = (delta + gamma * lam * carry) * m
    return advantage, advantage

  _, advantages = jax.lax.scan(back, jnp.zeros(rewards.shape[0], rewards.dtype), (deltas.T, mask.T),
                               reverse=True)
  advantages = advantages.T
  return advantages, advantages + values


def masked_whiten(x: Array, mask: Array, eps: float = 1e-8) -> Array:
  """(x - mean) / std over the entries where mask is 1 (0 elsewhere)."""
  n = jnp.maximum(jnp.sum(mask), 1.0)
  mean = jnp.sum(x * mask) / n
  var = jnp.sum(jnp.square(x - mean) * mask) / n
  return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def clipped_policy_loss(logps: Array, old_logps: Array, advantages: Array, clip: float):
  """(loss, clipped) per token: max(-A ρ, -A clip(ρ, 1-ε, 1+ε)) with ρ = π / π_old, and whether the
  clipped term is the larger (what `clipfrac` averages)."""
  ratio = jnp.exp(logps - old_logps)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32)


def value_loss(values: Array, old_values: Array, returns: Array, clip: float) -> Array:
  """Per token: ½ max((V - R)², (V_clipped - R)²) with V_clipped within ±clip of the rollout's value."""
  clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  return 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))


def group_advantages(rewards: Array, group_size: int, scale: bool = True, eps: float = 1e-6) -> Array:
  """(B,) rewards of B / G groups of G consecutive samples of one prompt -> (r - group mean), divided
  by the group's standard deviation (+ eps) when `scale`."""
  groups = rewards.reshape(-1, group_size)
  centred = groups - jnp.mean(groups, axis=1, keepdims=True)
  if scale:
    centred = centred / (jnp.std(groups, axis=1, keepdims=True) + eps)
  return centred.reshape(rewards.shape)


def k3_kl(logps: Array, ref_logps: Array) -> Array:
  """Per token: π_ref/π - log(π_ref/π) - 1 >= 0, whose expectation under π is KL(π || π_ref)."""
  log_ratio = ref_logps - logps
  return jnp.exp(log_ratio) - log_ratio - 1.0


def token_weights(mask: Array, loss_type: str) -> tuple[Array, Array]:
  """(weights (B, N), count) with which Σ weights · loss / count averages per-token losses (B, N).
  "token": every response token of the minibatch weighs the same, Σ_i Σ_t l / Σ_i |o_i| (TRL's
  PPO, DAPO). "sequence": each answer's mean over its own tokens, then the mean over answers,
  (1/G) Σ_i (1/|o_i|) Σ_t l (GRPO, Shao et al. 2024, eq. 3): a long answer counts as much as a
  short one. Rows without tokens weigh nothing and are not counted."""
  if loss_type == "token":
    return mask, jnp.sum(mask)
  if loss_type == "sequence":
    lengths = jnp.sum(mask, axis=1, keepdims=True)
    return mask / jnp.maximum(lengths, 1.0), jnp.sum(lengths > 0).astype(mask.dtype)
  raise ValueError(f"loss type must be one of {LOSS_TYPES}, got {loss_type!r}")
