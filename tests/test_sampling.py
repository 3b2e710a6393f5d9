import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.generate.sampling import SamplingParams, check, sample, top_k_top_p_mask


def _params(batch, temperature=0.0, top_k=0, top_p=1.0):
  return jax.tree.map(jnp.asarray, SamplingParams.make(batch, temperature, top_k, top_p))


def _meta_top_p_set(probs, p):
  """Meta's sample_top_p in numpy: the set of tokens it can draw."""
  order = np.argsort(-probs, kind="stable")
  sorted_probs = probs[order]
  keep = ~(np.cumsum(sorted_probs) - sorted_probs > p)
  return set(order[keep].tolist())


_sample = jax.jit(sample)


def _draws(logits, n=400, **settings):
  keys = jax.random.split(jax.random.key(0), n)
  batch = jnp.broadcast_to(logits, (n,) + logits.shape)
  return np.asarray(_sample(batch, keys, _params(n, **settings)))


def test_top_k_never_draws_outside_the_k_largest():
  rng = np.random.default_rng(0)
  for trial in range(5):
    logits = jnp.asarray(rng.normal(size=50) * 2, jnp.float32)
    k = 3 + trial
    drawn = set(_draws(logits, temperature=1.5, top_k=k).tolist())
    allowed = set(np.argsort(-np.asarray(logits))[:k].tolist())
    assert drawn <= allowed and len(drawn) > 1


def test_top_p_keeps_exactly_meta_s_nucleus():
  rng = np.random.default_rng(1)
  for p in (0.3, 0.6, 0.9):
    logits = jnp.asarray(rng.normal(size=40) * 2, jnp.float32)
    allowed = _meta_top_p_set(np.asarray(jax.nn.softmax(logits)), p)
    masked = np.asarray(top_k_top_p_mask(logits[None], jnp.array([0]), jnp.array([p])))[0]
    assert set(np.flatnonzero(np.isfinite(masked)).tolist()) == allowed
    assert set(_draws(logits, temperature=1.0, top_p=p).tolist()) <= allowed


def test_sampled_frequencies_follow_softmax_of_logits_over_temperature():
  # An independent reference: token i is drawn with probability softmax(logits / T)_i.
  logits = jnp.asarray([2.0, 1.0, 0.0, -1.0], jnp.float32)
  n = 20000
  for temperature in (0.5, 2.0):
    expected = np.asarray(jax.nn.softmax(logits / temperature))
    counts = np.bincount(_draws(logits, n=n, temperature=temperature), minlength=4) / n
    # 5 standard errors of a binomial share
    tolerance = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-3
    assert np.all(np.abs(counts - expected) <= tolerance), (temperature, counts, expected)


def test_top_k_then_top_p_and_greedy():
  logits = jnp.asarray([[0.0, 3.0, 2.9, 1.0, -1.0]], jnp.float32)
  keys = jax.random.split(jax.random.key(0), 1)
  assert _sample(logits, keys, _params(1)).tolist() == [1]
  # top-k=1 at any temperature is greedy
  assert _sample(logits, keys, _params(1, temperature=5.0, top_k=1)).tolist() == [1]
  masked = np.asarray(top_k_top_p_mask(logits, jnp.array([3]), jnp.array([1.0])))
  assert np.isfinite(masked).tolist() == [[False, True, True, True, False]]
  # top-k first, then the nucleus over the renormalised survivors: of {3.0, 2.9} (k=2), p=0.4
  # keeps the first only (its mass 0.52 > 0.4 before the second)
  masked = np.asarray(top_k_top_p_mask(logits, jnp.array([2]), jnp.array([0.4])))
  assert np.isfinite(masked).tolist() == [[False, True, False, False, False]]


def _top_k_top_p_set(logits, k, p):
  """Top-k (every logit at least the k-th largest), then Meta's nucleus over those survivors,
  renormalised, in numpy: the set of tokens that can be drawn."""
  logits = np.asarray(logits, np.float64)
  if 0 < k < len(logits):
    survivors = np.flatnonzero(logits >= np.sort(logits)[::-1][k - 1])
  else:
    survivors = np.arange(len(logits))
  probs = np.exp(logits[survivors] - logits[survivors].max())
  nucleus = _meta_top_p_set(probs / probs.sum(), p)
  last = min(logits[survivors[i]] for i in nucleus)  # tokens tied with the last kept one stay too
  return {int(i) for i in survivors if logits[i] >= last}


def test_the_nucleus_covers_every_top_k_survivor_ties_included():
  # [3, 2, 2, 2, 1], k=2: the three 2s tie with the 2nd largest and all survive top-k; over the
  # four, the mass before the first 2 is 0.475 <= 0.6, so the nucleus keeps the 2s too.
  logits = jnp.asarray([[3.0, 2.0, 2.0, 2.0, 1.0]], jnp.float32)
  masked = np.asarray(top_k_top_p_mask(logits, jnp.array([2]), jnp.array([0.6])))
  assert np.isfinite(masked).tolist() == [[True, True, True, True, False]]
  assert set(_draws(logits[0], n=400, temperature=1.0, top_k=2, top_p=0.6).tolist()) == {0, 1, 2, 3}
  # 300 rows of logits of a few values (many ties, as bfloat16 rounding makes them), each with
  # its own k and p, in one call.
  rng = np.random.default_rng(2)
  logits = rng.integers(-3, 4, size=(300, 12)).astype(np.float32)
  k = rng.integers(0, 14, size=300)
  p = rng.uniform(0.05, 1.0, size=300).astype(np.float32)
  masked = np.asarray(top_k_top_p_mask(jnp.asarray(logits), jnp.asarray(k, jnp.int32), jnp.asarray(p)))
  for row in range(300):
    expected = _top_k_top_p_set(logits[row], int(k[row]), float(p[row]))
    assert set(np.flatnonzero(np.isfinite(masked[row])).tolist()) == expected, (logits[row], k[row], p[row])


def test_top_k_with_no_nucleus_keeps_exactly_k():
  # top_p = 1 cuts nothing, though float32's cumulative sum of the k probabilities can reach 1
  # before the k-th: here k - 1 near-equal logits, then one far below them, then the rest.
  rng = np.random.default_rng(3)
  k = rng.integers(3, 40, size=300)
  rows = [np.concatenate([rng.normal(0, 0.01, n - 1), [-40.0], np.full(64 - n, -60.0)]) for n in k]
  masked = np.asarray(top_k_top_p_mask(jnp.asarray(np.stack(rows), jnp.float32), jnp.asarray(k, jnp.int32),
                                       jnp.ones((300,), jnp.float32)))
  np.testing.assert_array_equal(np.isfinite(masked).sum(axis=1), k)


def test_rows_keep_their_own_settings():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(3, 30)) * 2, jnp.float32)
  params = jax.tree.map(jnp.asarray, SamplingParams.stack([(0.0, 0, 1.0), (1.0, 2, 1.0), (1.0, 0, 1.0)]))
  draws = np.stack([np.asarray(_sample(logits, jax.random.split(jax.random.key(s), 3), params))
                    for s in range(200)])
  assert set(draws[:, 0].tolist()) == {int(np.argmax(logits[0]))}  # greedy row
  assert set(draws[:, 1].tolist()) <= set(np.argsort(-np.asarray(logits[1]))[:2].tolist())
  assert len(set(draws[:, 2].tolist())) > 2  # the untruncated row


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=1e39), "temperature must be at most 3.4e"),  # inf in float32
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_bad_settings_are_one_clear_error(bad, message):
  settings = dict(temperature=1.0, top_k=0, top_p=1.0) | bad
  with pytest.raises(ValueError, match=message):
    check(**settings)


def test_a_top_k_past_int32_cuts_nothing():
  # Any int is a valid top_k (a server takes it from JSON); one of the vocabulary's size or more
  # keeps every token, as 0 does, and must not overflow the int32 the settings are kept in.
  logits = jnp.asarray(np.random.default_rng(2).normal(size=30) * 2, jnp.float32)
  uncut = _draws(logits, temperature=1.0, top_k=0)
  for k in (30, 2 ** 31, 2 ** 40):
    np.testing.assert_array_equal(_draws(logits, temperature=1.0, top_k=k), uncut)
  assert SamplingParams.stack([(1.0, 2 ** 31, 1.0), (1.0, 5, 1.0)]).top_k.tolist() == [0, 5]



@pytest.mark.parametrize("temperature", [1e-40, 2e-38, 1e-37, 1e-30])
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature):
  # logits / temperature overflows float32 (past 3.4e38: 2e-38 with logits over 6.8, 1e-37 over
  # 34, as a model's are; 1e-30 with logits of 1e9), or the temperature is subnormal (1e-40), which
  # a device may or may not flush to 0. Either way it is the limit of temperature -> 0, greedy, not
  # a draw among infinities or NaNs, with or without cuts. Rows are independent: the others, sampled
  # beside them, draw what they draw without them.
  rng = np.random.default_rng(4)
  scales = np.resize([1.0, 30.0, 1e9], 12)[:, None]
  logits = jnp.asarray(rng.normal(size=(12, 50)) * scales, jnp.float32)
  settings = [(temperature, 0, 1.0), (temperature, 5, 1.0), (temperature, 0, 0.9), (1.0, 0, 1.0)] * 3
  tiny = np.array([t == temperature for t, _, _ in settings])
  keys = jax.random.split(jax.random.key(0), 12)
  drawn = np.asarray(_sample(logits, keys, jax.tree.map(jnp.asarray, SamplingParams.stack(settings))))
  np.testing.assert_array_equal(drawn[tiny], np.argmax(np.asarray(logits), axis=-1)[tiny])
  beside = [(0.0, 0, 1.0) if t else (1.0, 0, 1.0) for t in tiny]
  alone = np.asarray(_sample(logits, keys, jax.tree.map(jnp.asarray, SamplingParams.stack(beside))))
  np.testing.assert_array_equal(drawn[~tiny], alone[~tiny])


def test_logits_masked_with_the_float32_minimum_are_never_drawn_and_the_rest_still_are():
  # A mask of finfo(float32).min (as attention masks write) goes to -inf over a temperature below
  # 1: those tokens are out, and the row is still a draw, not made greedy by the "overflow".
  logits = np.zeros((1, 20), np.float32)
  logits[0, 10:] = np.finfo(np.float32).min
  params = jax.tree.map(jnp.asarray, SamplingParams.stack([(0.7, 0, 1.0)]))
  drawn = {int(_sample(jnp.asarray(logits), jax.random.split(jax.random.key(s), 1), params)[0])
           for s in range(50)}
  assert drawn <= set(range(10)) and len(drawn) > 3
