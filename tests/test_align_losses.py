"""llama_jax.align.losses against plain numpy transcriptions of the papers' equations: DPO
(Rafailov et al. 2023, eq. 7), IPO (Azar et al. 2023, eq. 17), Bradley-Terry (InstructGPT eq. 1),
InstructGPT's KL-shaped reward, GAE (Schulman et al. 2016) as the backward loop over one episode,
PPO's clipped surrogate (Schulman et al. 2017, eq. 7) and clipped value loss, GRPO's advantages and
its per-answer averaging (Shao et al. 2024, eq. 3)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.align import losses


def log_sigmoid(x):
  return -math.log1p(math.exp(-x))


@pytest.fixture
def logps():
  rng = np.random.default_rng(0)
  return [rng.normal(-20, 5, size=16).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_is_the_papers_equation(logps, beta):
  pc, pr, rc, rr = logps
  loss, chosen, rejected = losses.dpo_loss(*map(jnp.asarray, logps), beta)
  for i in range(16):
    # L_DPO = -log σ(β log π(y_w|x)/π_ref(y_w|x) - β log π(y_l|x)/π_ref(y_l|x))
    expected = -log_sigmoid(beta * (pc[i] - rc[i]) - beta * (pr[i] - rr[i]))
    np.testing.assert_allclose(loss[i], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chosen[i], beta * (pc[i] - rc[i]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rejected[i], beta * (pr[i] - rr[i]), rtol=1e-5, atol=1e-5)


def test_ipo_loss_is_the_papers_equation(logps):
  tau = 0.1
  pc, pr, rc, rr = logps
  loss, _, _ = losses.dpo_loss(*map(jnp.asarray, logps), tau, loss_type="ipo")
  for i in range(16):
    # h = log[π(y_w) π_ref(y_l) / (π(y_l) π_ref(y_w))]; L_IPO = (h - 1/(2τ))²
    h = (pc[i] + rr[i]) - (pr[i] + rc[i])
    np.testing.assert_allclose(loss[i], (h - 1 / (2 * tau)) ** 2, rtol=1e-4)


def test_dpo_loss_at_the_reference_is_log_two_and_falls_with_the_margin(logps):
  pc, pr, _, _ = map(jnp.asarray, logps)
  loss, chosen, rejected = losses.dpo_loss(pc, pr, pc, pr, 0.1)
  np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
  assert float(jnp.abs(chosen).max()) == 0 and float(jnp.abs(rejected).max()) == 0
  better, _, _ = losses.dpo_loss(pc + 1, pr - 1, pc, pr, 0.1)
  assert bool(jnp.all(better < loss))
  with pytest.raises(ValueError, match="dpo.loss"):
    losses.dpo_loss(pc, pr, pc, pr, 0.1, loss_type="hinge")


def test_reward_loss_is_bradley_terry():
  rng = np.random.default_rng(1)
  rc, rr = rng.normal(size=8), rng.normal(size=8)
  got = losses.reward_loss(jnp.asarray(rc), jnp.asarray(rr))
  # P(y_c ≻ y_r) = exp(r_c) / (exp(r_c) + exp(r_r)); the loss is its negative log
  expected = [-math.log(math.exp(c) / (math.exp(c) + math.exp(r))) for c, r in zip(rc, rr)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def episodes(seed=2, b=5, n=7):
  """Left-aligned responses of random lengths (one of full length, one of length 1)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, n + 1, size=b)
  lengths[0], lengths[1] = n, 1
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
  return rng, lengths, mask


def test_kl_shaped_reward_is_instructgpts():
  rng, lengths, mask = episodes()
  logp, ref, scores = rng.normal(size=mask.shape), rng.normal(size=mask.shape), rng.normal(size=len(lengths))
  rewards, kl = losses.kl_shaped_rewards(jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(scores),
                                         jnp.asarray(mask), 0.05)
  for b, n in enumerate(lengths):
    expected = [-0.05 * (logp[b, t] - ref[b, t]) + (scores[b] if t == n - 1 else 0.0) for t in range(n)]
    np.testing.assert_allclose(rewards[b, :n], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rewards[b, n:], 0.0)
    np.testing.assert_allclose(kl[b, :n], logp[b, :n] - ref[b, :n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_equals_the_backward_loop(gamma, lam):
  rng, lengths, mask = episodes()
  rewards = rng.normal(size=mask.shape) * mask
  values = rng.normal(size=mask.shape)
  adv, ret = losses.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  for b, n in enumerate(lengths):
    # δ_t = r_t + γ V(s_{t+1}) - V(s_t), V = 0 after the episode; A_t = δ_t + γλ A_{t+1}
    expected, last = np.zeros(n), 0.0
    for t in reversed(range(n)):
      next_value = values[b, t + 1] if t + 1 < n else 0.0
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      last = delta + gamma * lam * last
      expected[t] = last
    np.testing.assert_allclose(adv[b, :n], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ret[b, :n], expected + values[b, :n], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(adv[b, n:], 0.0)


def test_masked_whiten_uses_only_the_response():
  rng, lengths, mask = episodes()
  x = rng.normal(3.0, 2.0, size=mask.shape)
  got = np.asarray(losses.masked_whiten(jnp.asarray(x), jnp.asarray(mask)))
  kept = x[mask > 0]
  np.testing.assert_allclose(got[mask > 0], (kept - kept.mean()) / kept.std(), rtol=1e-4, atol=1e-5)
  assert np.all(got[mask == 0] == 0)


def test_clipped_policy_and_value_losses():
  rng = np.random.default_rng(3)
  logp, old = rng.normal(size=64) * 0.3, rng.normal(size=64) * 0.3
  adv, values, old_values, returns = (rng.normal(size=64) for _ in range(4))
  eps = 0.2
  loss, clipped = losses.clipped_policy_loss(*map(jnp.asarray, (logp, old, adv)), eps)
  vloss = losses.value_loss(*map(jnp.asarray, (values, old_values, returns)), eps)
  for i in range(64):
    ratio = math.exp(logp[i] - old[i])
    # L^CLIP = min(ρ A, clip(ρ, 1-ε, 1+ε) A), to be maximised: the loss is its negative
    surrogate = min(ratio * adv[i], min(max(ratio, 1 - eps), 1 + eps) * adv[i])
    np.testing.assert_allclose(loss[i], -surrogate, rtol=1e-5, atol=1e-6)
    assert bool(clipped[i]) == (-min(max(ratio, 1 - eps), 1 + eps) * adv[i] > -ratio * adv[i])
    v_clip = old_values[i] + min(max(values[i] - old_values[i], -eps), eps)
    expected = 0.5 * max((values[i] - returns[i]) ** 2, (v_clip - returns[i]) ** 2)
    np.testing.assert_allclose(vloss[i], expected, rtol=1e-5, atol=1e-6)
  assert 0 < float(jnp.mean(clipped)) < 1  # both cases occur


def test_group_advantages_and_k3():
  rewards = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 4.0], np.float32)  # two groups of 4
  got = np.asarray(losses.group_advantages(jnp.asarray(rewards), 4))
  for g in range(2):
    r = rewards[4 * g:4 * g + 4]
    np.testing.assert_allclose(got[4 * g:4 * g + 4], (r - r.mean()) / (r.std() + 1e-6), rtol=1e-5)
  np.testing.assert_allclose(losses.group_advantages(jnp.asarray(rewards), 4, scale=False)[:4],
                             rewards[:4] - rewards[:4].mean(), rtol=1e-6)
  logp, ref = np.log([0.5, 0.2]), np.log([0.25, 0.4])
  np.testing.assert_allclose(losses.k3_kl(jnp.asarray(logp), jnp.asarray(ref)),
                             np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-6)


def test_token_weights_average_as_ppo_and_as_grpos_equation():
  rng = np.random.default_rng(1)
  lengths = [1, 4, 0, 3]  # a row without tokens (a padding prompt) counts for nothing
  mask = np.array([[t < n for t in range(4)] for n in lengths], np.float32)
  per_token = rng.normal(size=(4, 4)).astype(np.float32)
  answers = [per_token[i, :n] for i, n in enumerate(lengths) if n]
  # GRPO, Shao et al. 2024, eq. 3: (1/G) Σ_i (1/|o_i|) Σ_t l_{i,t}
  grpo = np.mean([a.sum() / len(a) for a in answers])
  # all response tokens alike: Σ_i Σ_t l_{i,t} / Σ_i |o_i|
  ppo = np.sum(np.concatenate(answers)) / sum(lengths)
  for loss_type, expected in (("sequence", grpo), ("token", ppo)):
    weights, count = losses.token_weights(jnp.asarray(mask), loss_type)
    np.testing.assert_allclose(float(jnp.sum(weights * per_token) / count), expected, rtol=1e-6)
  assert grpo != pytest.approx(ppo)
  with pytest.raises(ValueError, match="loss type"):
    losses.token_weights(jnp.asarray(mask), "tokens")
