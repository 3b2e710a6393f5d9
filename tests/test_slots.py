"""The slot engine (continuous batching): requests that join and leave a running batch decode what
`generate_tokens` decodes for them alone, and the log-probabilities are the full forward pass's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import model as M
from llama_jax import sharding
from llama_jax.config import ModelConfig
from llama_jax.generate import engine, generate_tokens, slots

TINY = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=320, multiple_of=16,
                   max_seq_len=64)
GREEDY = (0.0, 0, 1.0)
SAMPLED = (0.9, 40, 0.9)


@pytest.fixture(scope="module")
def params():
  return nn.unbox(M.init_params(TINY, jax.random.key(0)))


@pytest.fixture(scope="module")
def slot_engine(params):
  return slots.SlotEngine(TINY, params, max_batch=4, steps=3)


def _prompts(lengths, seed=1):
  rng = np.random.default_rng(seed)
  return [[1] + rng.integers(3, TINY.vocab_size, n - 1).tolist() for n in lengths]


class _Driver:
  """The host's part in its simplest form: which request holds which slot, tokens collected."""

  def __init__(self, eng):
    self.eng, self.state, self.out, self.owner = eng, eng.init(), {}, {}

  def admit(self, name, prompt, slot, sampling=GREEDY, seed=0):
    prefix = self.eng.prefill(prompt, slots.row_key(seed), sampling)
    self.state = self.eng.insert(prefix, self.state, slot)
    self.out[name] = [int(prefix.drawn.tokens[0, 0])]
    self.owner[slot] = name

  def step(self, rows=None):
    self.state, drawn = self.eng.generate(self.state, rows=rows)
    tokens = np.asarray(drawn.tokens)
    assert tokens.shape == (rows or self.eng.max_batch, self.eng.steps)
    for slot, name in self.owner.items():
      self.out[name] += tokens[slot].tolist()

  def leave(self, slot):
    del self.owner[slot]


@pytest.mark.slow
def test_requests_joining_and_leaving_decode_what_they_decode_alone(params, slot_engine):
  a, b, c, d = _prompts([5, 20, 3, 33])
  driver = _Driver(slot_engine)
  driver.admit("a", a, slot=0)
  driver.step()
  driver.admit("b", b, slot=2, sampling=SAMPLED, seed=7)  # joins a running batch
  driver.step()
  driver.leave(0)
  driver.admit("c", c, slot=0)  # into a slot whose cache still holds a's keys and values
  driver.admit("d", d, slot=1, sampling=SAMPLED, seed=11)
  for _ in range(4):
    driver.step()
  assert {k: len(v) for k, v in driver.out.items()} == {"a": 7, "b": 16, "c": 13, "d": 13}
  # Greedy rows don't depend on keys; sampled rows are row 0 of a call with their seed.
  greedy = generate_tokens(TINY, params, [a, c], 16)
  assert driver.out["a"] == greedy[0][:7]
  assert driver.out["c"] == greedy[1][:13]
  for name, prompt, seed in (("b", b, 7), ("d", d, 11)):
    alone = generate_tokens(TINY, params, [prompt], 16, temperature=SAMPLED[0], top_k=SAMPLED[1],
                            top_p=SAMPLED[2], seed=seed)[0]
    assert driver.out[name] == alone[:len(driver.out[name])]


def test_light_load_runs_the_leading_slots_only_and_decodes_the_same(params, slot_engine):
  assert slot_engine.row_buckets == [1, 4] and slot_engine.rows_for(2) == 4
  a, b = _prompts([7, 12], seed=5)
  driver = _Driver(slot_engine)
  driver.admit("a", a, slot=0)
  driver.step(rows=1)
  driver.step(rows=1)
  driver.admit("b", b, slot=1)
  driver.step(rows=4)
  driver.step(rows=4)
  assert {k: len(v) for k, v in driver.out.items()} == {"a": 13, "b": 7}
  expected = generate_tokens(TINY, params, [a, b], 13)
  assert driver.out["a"] == expected[0] and driver.out["b"] == expected[1][:7]


def test_new_prompts_and_settings_of_a_bucket_reuse_the_compiled_functions(slot_engine):
  driver = _Driver(slot_engine)
  driver.admit("x", _prompts([4])[0], slot=0)
  driver.step()
  before = dict(engine.TRACE_COUNTS)
  driver.admit("y", _prompts([9], seed=2)[0], slot=3, sampling=(1.3, 5, 0.5), seed=3)
  driver.step()
  assert dict(engine.TRACE_COUNTS) == before
  assert slot_engine.prompt_buckets == [16, 32, 64]


def test_logprobs_are_the_full_forward_log_softmax(params, slot_engine):
  prompt = _prompts([6], seed=3)[0]
  state = slot_engine.init()
  prefix = slot_engine.prefill(prompt, slots.row_key(0), GREEDY)
  state = slot_engine.insert(prefix, state, 1)
  state, drawn = slot_engine.generate(state, top_logprobs=5)
  tokens = [int(prefix.drawn.tokens[0, 0])] + np.asarray(drawn.tokens[1]).tolist()
  logprobs = [float(prefix.drawn.logprobs[0, 0])] + np.asarray(drawn.logprobs[1]).tolist()
  full = np.asarray(M.forward(TINY, params, jnp.asarray([prompt + tokens])))[0]
  reference = jax.nn.log_softmax(full[len(prompt) - 1:len(prompt) - 1 + len(tokens)], axis=-1)
  np.testing.assert_allclose(logprobs, reference[np.arange(len(tokens)), tokens], rtol=1e-4, atol=1e-4)
  top = np.asarray(drawn.top_tokens[1])  # (steps, 5) for tokens 1..
  np.testing.assert_array_equal(top[:, 0], tokens[1:])  # greedy: the best is the one drawn
  np.testing.assert_allclose(np.asarray(drawn.top_logprobs[1]),
                             np.sort(reference[1:], axis=-1)[:, ::-1][:, :5], rtol=1e-4, atol=1e-4)


def test_cache_length_outside_the_context_is_refused(params):
  with pytest.raises(ValueError, match="cache length"):
    slots.SlotEngine(TINY, params, max_batch=2, cache_len=TINY.max_seq_len + 1)


@pytest.mark.slow
def test_a_tensor_parallel_mesh_decodes_the_same(params, slot_engine):
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
  split = slots.SlotEngine(TINY, params, max_batch=4, steps=3, mesh=mesh)
  assert split.params.layers[0]["attention"]["wq"].sharding.spec[1] == "tensor"  # heads split
  assert split.init().cache[0].k.sharding.spec[1] == "tensor"  # and the cache's K/V heads with them
  prompt = _prompts([9], seed=4)[0]
  out = {}
  for name, eng in (("one device", slot_engine), ("mesh", split)):
    driver = _Driver(eng)
    driver.admit("a", prompt, slot=0)
    driver.step()
    out[name] = driver.out["a"]
  assert out["mesh"] == out["one device"]


@pytest.mark.slow
def test_warmup_compiles_every_shape_a_request_can_take(slot_engine):
  slot_engine.warmup()
  before = dict(engine.TRACE_COUNTS)
  driver = _Driver(slot_engine)
  for slot, n in enumerate([1, 17, 40, TINY.max_seq_len]):  # every prompt bucket
    driver.admit(str(slot), _prompts([n], seed=n)[0], slot=slot, sampling=SAMPLED)
  state = driver.state
  for rows in slot_engine.row_buckets:
    state, _ = slot_engine.generate(state, rows=rows)
  slot_engine.generate(state, top_logprobs=slots.MAX_TOP_LOGPROBS)
  assert dict(engine.TRACE_COUNTS) == before
