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
  # Windows from 16 positions, so that the tiny cache has several (16, 24, 32, 48, 64).
  return slots.SlotEngine(TINY, params, max_batch=4, steps=3, min_attend=16)


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

  def admit_together(self, admissions):
    """[(name, prompt, slot, sampling, seed)] through one `prefill_into`."""
    names, prompts, slots_, sampling, seeds = zip(*admissions)
    self.state, calls = self.eng.prefill_into(self.state, list(prompts), list(seeds), list(sampling),
                                              list(slots_))
    for chosen, drawn in calls:
      for row, i in enumerate(chosen):
        self.out[names[i]] = [int(drawn.tokens[row, 0])]
        self.owner[slots_[i]] = names[i]
    return calls

  def step(self, rows=None, steps=None, need=None, greedy=False):
    self.state, drawn = self.eng.generate(self.state, rows=rows, steps=steps, need=need, greedy=greedy)
    tokens = np.asarray(drawn.tokens)
    assert tokens.shape == (rows or self.eng.max_batch, self.eng.max_steps)
    for slot, name in self.owner.items():
      self.out[name] += tokens[slot, :steps or self.eng.steps].tolist()

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


def test_call_lengths_compiled_or_data_decode_the_same(params, slot_engine):
  """A call length the engine compiles for (a trip count XLA knows) and one it does not (the loop
  count is data) continue each other exactly, with or without `static_steps`."""
  assert slot_engine.call_lengths == [3, 6, 12] and slot_engine.static_steps
  a, b = _prompts([6, 14], seed=9)
  expected = generate_tokens(TINY, params, [a, b], 1 + 3 + 2 + 6 + 1)
  for eng in (slot_engine, slots.SlotEngine(TINY, params, max_batch=4, steps=3, min_attend=16,
                                            static_steps=False)):
    driver = _Driver(eng)
    driver.admit("a", a, slot=0)
    driver.admit("b", b, slot=1)
    for steps in (3, 2, 6, 1):
      driver.step(rows=4, steps=steps)
    assert [driver.out["a"], driver.out["b"]] == expected


def test_an_all_greedy_call_draws_what_the_sampler_draws_for_greedy_rows(params, slot_engine):
  """`greedy=True` (the argmax, no sampler branches) continues and is continued by the general
  calls exactly, for compiled call lengths and others."""
  a, b = _prompts([9, 4], seed=10)
  expected = generate_tokens(TINY, params, [a, b], 1 + 3 + 6 + 2 + 3)
  driver = _Driver(slot_engine)
  driver.admit("a", a, slot=0)
  driver.admit("b", b, slot=2)
  for steps, greedy in ((3, True), (6, False), (2, True), (3, True)):
    driver.step(rows=4, steps=steps, greedy=greedy)
  assert [driver.out["a"], driver.out["b"]] == expected


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
  steps = slot_engine.steps
  tokens = [int(prefix.drawn.tokens[0, 0])] + np.asarray(drawn.tokens[1, :steps]).tolist()
  logprobs = [float(prefix.drawn.logprobs[0, 0])] + np.asarray(drawn.logprobs[1, :steps]).tolist()
  full = np.asarray(M.forward(TINY, params, jnp.asarray([prompt + tokens])))[0]
  reference = jax.nn.log_softmax(full[len(prompt) - 1:len(prompt) - 1 + len(tokens)], axis=-1)
  np.testing.assert_allclose(logprobs, reference[np.arange(len(tokens)), tokens], rtol=1e-4, atol=1e-4)
  top = np.asarray(drawn.top_tokens[1, :steps])  # (steps, 5) for tokens 1..
  np.testing.assert_array_equal(top[:, 0], tokens[1:])  # greedy: the best is the one drawn
  np.testing.assert_allclose(np.asarray(drawn.top_logprobs[1, :steps]),
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


_COMPILED: list[str] | None = None  # while a test listens: the names of the programs XLA compiles


def _on_event(event, duration, **kwargs):
  if _COMPILED is not None and event == "/jax/core/compile/backend_compile_duration":
    _COMPILED.append(str(kwargs.get("fun_name", "?")))


jax.monitoring.register_event_duration_secs_listener(_on_event)


@pytest.mark.slow
def test_warmup_compiles_every_shape_a_request_can_take(params):
  """No compilation after warmup, whatever order requests come in: a prefill after decode calls
  (its state then comes out of `generate`) included. Counted as XLA compilations, not traces: an
  argument that differs only in being committed to a device recompiles without retracing. The
  parameters are committed, as a loaded model's are (then so is every call's output)."""
  global _COMPILED
  # Two call lengths, not the default three: every program is compiled here (48, not 69).
  slot_engine = slots.SlotEngine(TINY, jax.device_put(params, jax.devices()[0]), max_batch=4, steps=3,
                                 max_steps=6, min_attend=16)
  slot_engine.warmup()
  before = dict(engine.TRACE_COUNTS)
  _COMPILED = []
  try:
    driver = _Driver(slot_engine)
    state = None
    for round_ in range(2):  # the second round's prefills take states that decode calls made
      # Batched prefills (the server's way in) of every row count and prompt bucket (counts that
      # split or pad included).
      for count in range(1, slot_engine.max_batch + 1):
        for n in (1, 17, 40, TINY.max_seq_len):
          driver.admit_together([(f"{round_}.{count}.{n}.{i}", _prompts([n], seed=i)[0], i, SAMPLED, i)
                                 for i in range(count)])
      state = driver.state
      for rows in slot_engine.row_buckets:
        for need in range(1, TINY.max_seq_len + 2):  # every window, and past the cache's end
          for steps in slot_engine.call_lengths:  # one program each (the scheduler's lengths)
            for greedy in (False, True):
              state, _ = slot_engine.generate(state, rows=rows, steps=steps, need=need, greedy=greedy)
        state, _ = slot_engine.generate(state, rows=rows)
      state, _ = slot_engine.generate(state, top_logprobs=slots.MAX_TOP_LOGPROBS, need=5)
      driver.state = state
    serving = [name for name in _COMPILED if "prefill_insert" in name or "generate" in name]
  finally:
    _COMPILED = None
  assert serving == []
  assert dict(engine.TRACE_COUNTS) == before


@pytest.mark.parametrize("packed", [True, False])
def test_batched_prefill_gives_each_prompt_what_it_gets_alone(params, slot_engine, packed):
  """Prompts of two length buckets into scattered slots, greedy beside seeded sampling, in calls
  that pad: packed, all four side by side in one row; one a row, three in a 4-row call of 16 and
  the 32 bucket alone. Then the same one prompt per call: the same first tokens and
  log-probabilities, and the same tokens decoded after (so the same keys and values in the cache)."""
  lengths = [5, 20, 3, 9]  # buckets 16, 32, 16, 16
  prompts = _prompts(lengths, seed=8)
  sampling = [GREEDY, SAMPLED, SAMPLED, GREEDY]
  seeds = [0, 7, 2 ** 40 + 11, -3]  # any int: its low 32 bits count, as row_key's
  where = [2, 0, 3, 1]
  eng = slot_engine if packed else slots.SlotEngine(TINY, params, max_batch=4, steps=3, min_attend=16,
                                                    pack_prompts=False)
  together, alone = _Driver(eng), _Driver(eng)
  calls = together.admit_together([(str(i), prompts[i], where[i], sampling[i], seeds[i]) for i in range(4)])
  if packed:  # all four side by side in one row of 64, longest first, then 27 tokens of padding
    assert eng.pack(lengths) == [((1, 64), [[1, 3, 0, 2]])]
    assert [chosen for chosen, _ in calls] == [[1, 3, 0, 2]]
  else:
    assert sorted(len(drawn.tokens) for _, drawn in calls) == [1, 4]  # the 32 bucket alone, three padded to 4
  for i in range(4):
    alone.admit(str(i), prompts[i], where[i], sampling[i], seeds[i])
  logprobs = {}
  for chosen, drawn in calls:
    for row, i in enumerate(chosen):
      logprobs[i] = float(drawn.logprobs[row, 0])
  for i in range(4):
    prefix = eng.prefill(prompts[i], slots.row_key(seeds[i]), sampling[i])
    assert logprobs[i] == pytest.approx(float(prefix.drawn.logprobs[0, 0]), abs=1e-5)
  for driver in (together, alone):
    driver.step()
    driver.step()
  assert together.out == alone.out and all(len(v) == 7 for v in together.out.values())


def test_a_batched_prefill_leaves_the_other_slots_alone(params, slot_engine):
  a, b, c = _prompts([6, 11, 4], seed=9)
  driver = _Driver(slot_engine)
  driver.admit_together([("a", a, 1, GREEDY, 0)])
  driver.step()
  driver.admit_together([("b", b, 0, GREEDY, 0), ("c", c, 3, GREEDY, 0)])  # padded: 2 of 4 rows
  driver.step()
  driver.step()
  expected = generate_tokens(TINY, params, [a, b, c], 10)
  assert driver.out == {"a": expected[0][:10], "b": expected[1][:7], "c": expected[2][:7]}


def test_prefill_calls_pad_small_counts_and_split_large_ones(params):
  eng = slots.SlotEngine(TINY, params, max_batch=64, steps=3, prefill_tokens=256)
  assert eng.row_buckets == [1, 4, 16, 64]
  assert eng.prefill_rows(16) == [1, 4, 16] and eng.prefill_rows(64) == [1, 4] and eng.prefill_rows(512) == [1]
  assert eng.split(3, 16) == [4]  # one padding row: cheaper than three calls
  assert eng.split(5, 16) == [4, 1]  # 16 rows would be eleven of padding
  assert eng.split(9, 16) == [16]
  assert eng.split(40, 16) == [16, 16, 16]
  assert eng.split(6, 64) == [4, 4]
  assert eng.split(3, 512) == [1, 1, 1]


def test_prompts_pack_into_the_rows_of_compiled_shapes(params, monkeypatch):
  """First fit, longest first, into the compiled calls of least padding, a call counted as
  PREFILL_CALL_TOKENS more: one that takes them all, or the largest they fill and then the rest."""
  monkeypatch.setattr(slots, "PREFILL_CALL_TOKENS", 128)
  eng = slots.SlotEngine(TINY.replace(max_seq_len=512), params, max_batch=64, steps=3, prefill_tokens=1024)
  assert eng.prefill_shapes[:4] == [(1, 16), (4, 16), (16, 16), (64, 16)]
  assert eng.pack([200]) == [((1, 256), [[0]])]
  assert eng.pack([100, 60, 90]) == [((1, 256), [[0, 2, 1]])]  # 250 of 256
  # 400 tokens: one call of 512 (cost 512 + 128) beats 256 + 128 (250 of them) and 256 + 128 more.
  assert eng.pack([130, 120, 70, 50, 30]) == [((1, 512), [[0, 1, 2, 3, 4]])]
  # 300 tokens: a row of 256 filled, then 50 in a call of 64 (cost 576), beats one call of 512.
  assert eng.pack([130, 120, 50]) == [((1, 256), [[0, 1]]), ((1, 64), [[2]])]
  monkeypatch.setattr(slots, "PREFILL_CALL_TOKENS", 448)  # a dearer call: one of 512 instead
  assert eng.pack([130, 120, 50]) == [((1, 512), [[0, 1, 2]])]
  # No two fit a row, and a call of 4 rows of 512 is past prefill_tokens: a call each.
  assert eng.pack([300] * 3) == [((1, 512), [[0]]), ((1, 512), [[1]]), ((1, 512), [[2]])]
  # At most max_batch prompts a call, however short.
  calls = eng.pack([1] * 70)
  assert sum(len(row) for _, rows in calls for row in rows) == 70
  assert all(sum(len(row) for row in rows) <= 64 for _, rows in calls)


def test_the_ragged_kernel_reads_the_whole_cache_without_windows(params):
  """With the Pallas attention (each slot reads its own length) a call never copies a window: one
  program per row bucket, call length and sampler kind, where XLA's attention has one per window
  for the larger row buckets."""
  kwargs = dict(max_batch=16, cache_len=64, steps=2, min_attend=16)
  xla = slots.SlotEngine(TINY, params, decode_attention="xla", **kwargs)
  ragged = slots.SlotEngine(TINY, params, decode_attention="pallas", **kwargs)
  assert ragged.attend_for(16, 0, need=10) == 64 and xla.attend_for(16, 0, need=10) == 16
  assert {a for _, a, *_ in ragged.generate_shapes} == {64}
  lengths = len(ragged.call_lengths)
  # rows 1, 4, 16, each greedy or not, and all rows with alternatives; XLA: 5 windows at 4 and 16
  assert len(ragged.generate_shapes) == (3 * 2 + 1) * lengths
  assert len(xla.generate_shapes) == (1 * 2 + 2 * 5 * 2 + 1) * lengths


def test_attention_over_the_live_window_equals_the_whole_cache(slot_engine):
  """The same requests decoded over the smallest window that covers them and over the whole
  cache: the same tokens and log-probabilities, and the same cache afterwards where it was
  written (the window's writes are copied back)."""
  assert slot_engine.attend_buckets == [16, 24, 32, 48, 64]
  prompts = _prompts([5, 9, 3], seed=10)
  results = []
  for windowed in (True, False):
    driver = _Driver(slot_engine)
    driver.admit_together([(str(i), p, i, GREEDY, 0) for i, p in enumerate(prompts)])
    logprobs = []
    for _ in range(3):
      need = max(len(p) + len(driver.out[str(i)]) - 1 + slot_engine.steps for i, p in enumerate(prompts))
      assert need <= 20  # a window of 24 of the 64 positions, while the live slots fit
      driver.state, drawn = slot_engine.generate(driver.state, rows=4, need=need if windowed else None)
      for i in range(3):
        driver.out[str(i)] += np.asarray(drawn.tokens[i, :slot_engine.steps]).tolist()
      logprobs.append(np.asarray(drawn.logprobs[:3, :slot_engine.steps]))
    written = [len(p) + len(driver.out[str(i)]) - 1 for i, p in enumerate(prompts)]
    cache = [np.asarray(driver.state.cache[0].k[i, :, :written[i]]) for i in range(3)]
    results.append((driver.out, np.stack(logprobs), cache))
  (out_w, lp_w, cache_w), (out_f, lp_f, cache_f) = results
  assert out_w == out_f
  np.testing.assert_allclose(lp_w, lp_f, rtol=1e-5, atol=1e-5)
  for w, f in zip(cache_w, cache_f):
    np.testing.assert_allclose(w, f, rtol=1e-5, atol=1e-5)


def test_a_longer_call_draws_what_shorter_calls_draw(slot_engine):
  prompt = _prompts([7], seed=12)[0]
  out = []
  for calls in ([12], [3, 3, 3, 3], [1, 6, 5]):
    driver = _Driver(slot_engine)
    driver.admit("a", prompt, slot=0, sampling=SAMPLED, seed=5)
    for steps in calls:
      driver.step(rows=1, steps=steps)
    out.append(driver.out["a"])
  assert len(out[0]) == 13 and out[0] == out[1] == out[2]
  with pytest.raises(ValueError, match="steps"):
    slot_engine.generate(slot_engine.init(), steps=slot_engine.max_steps + 1)


def test_seed_key_in_a_call_is_row_key_of_the_seed():
  seeds = [0, 5, 2 ** 31 + 3, 2 ** 32 + 7, -1, 2 ** 63 - 1]
  inside = jax.jit(jax.vmap(slots.seed_key))(np.asarray([s & 0xFFFFFFFF for s in seeds], np.uint32))
  for s, key in zip(seeds, inside):
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(slots.row_key(s)))
