"""The scheduler's rounds, driven by hand on the test's thread (no HTTP, no scheduler thread): a
round's waiting requests are prefilled together and decode what they decode alone, calls grow
longer only while no request waits and no slot would idle long, and a round waits briefly for
arrivals only while that costs the device nothing."""

import concurrent.futures
import types

import flax.linen as nn
import jax
import pytest
from conftest import train_word_tokenizer, write_hf_tokenizer

from llama_jax import model as M
from llama_jax.config import ModelConfig
from llama_jax.generate import generate_tokens, slots
from llama_jax.serve.app import Server
from llama_jax.serve.scheduler import Request, Scheduler, TokenLogprob, _Live, token_text
from llama_jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return Tokenizer(train_word_tokenizer(tmp_path_factory.mktemp("tok"), 300))


@pytest.fixture(scope="module")
def setup(tokenizer):
  cfg = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=tokenizer.vocab_size,
                    multiple_of=16, max_seq_len=64)
  params = nn.unbox(M.init_params(cfg, jax.random.key(4)))
  return cfg, params, slots.SlotEngine(cfg, params, max_batch=4, steps=2, max_steps=8, min_attend=16)


def _request(prompt, max_tokens, outputs):
  return Request(prompt=prompt, max_tokens=max_tokens, emit=outputs.append, temperature=0.0,
                 ignore_eos=True)


@pytest.mark.slow
def test_a_round_prefills_its_waiting_requests_together(setup, tokenizer):
  cfg, params, engine = setup
  scheduler = Scheduler(engine, tokenizer, tokenizer.eos_ids)
  scheduler._state = engine.init()
  calls = []
  prefill_plan = engine.prefill_plan

  def counted(prompts, *args):
    plan = prefill_plan(prompts, *args)
    calls.extend(len(chosen) for chosen, _ in plan)
    return plan

  engine.prefill_plan = counted
  try:
    prompts = [tokenizer.encode(t) for t in ("the cat sat", "a big red dog ran", "blue tree")]
    limits = [9, 14, 5]
    outputs = [[] for _ in prompts]
    for prompt, limit, out in zip(prompts, limits, outputs):
      scheduler.submit(_request(prompt, limit, out))
    rounds = 0
    while any(not out or out[-1].finish_reason is None for out in outputs):
      scheduler._take_inbox(block=False)
      scheduler._round()
      rounds += 1
      assert rounds < 50
  finally:
    engine.prefill_plan = prefill_plan
  assert calls == [3]  # one round admitted all three, in one call (prompts of one bucket)
  expected = generate_tokens(cfg, params, prompts, max(limits))
  for out, want, limit in zip(outputs, expected, limits):
    assert [t for o in out for t in o.tokens] == want[:limit]
    assert out[-1].finish_reason == "length" and out[-1].completion_tokens == limit
  assert scheduler.stats()["live"] == 0


def test_calls_grow_only_while_nobody_waits_and_no_slot_would_idle_long(setup, tokenizer):
  _, _, engine = setup  # steps 2, max_steps 8
  scheduler = Scheduler(engine, tokenizer, tokenizer.eos_ids)

  def live(remaining):
    record = _Live(_request([1, 2], 100, []), 0, tokenizer, tokenizer.eos_ids)
    record.dispatched = 100 - remaining
    return record

  assert scheduler._steps_for([live(50)]) == 8
  assert scheduler._steps_for([live(5)]) == 4  # 8 steps would leave its slot idle for 3 of them
  assert scheduler._steps_for([live(1)]) == 2  # the engine's steps, whatever idles
  assert scheduler._steps_for([live(50)] * 7 + [live(1)]) == 8  # 7 idle slot-steps of 64
  assert scheduler._steps_for([live(50)] * 5 + [live(1)]) == 4  # 8: 7 of 48 is over an eighth
  assert scheduler._steps_for([live(50)] * 3 + [live(1)]) == 2
  scheduler._waiting.append(_request([1], 4, []))
  assert scheduler._steps_for([live(50)]) == 2  # someone waits for a slot: short calls


def test_a_failing_prefill_answers_every_request_of_its_round(setup, tokenizer):
  # The round's requests leave the waiting list before the device call: if it raises (out of
  # memory, say), each must still get its error answer, or its client would wait forever.
  _, _, engine = setup
  scheduler = Scheduler(engine, tokenizer, tokenizer.eos_ids)
  scheduler._state = engine.init()
  outputs = [[] for _ in range(3)]
  for out in outputs:
    scheduler.submit(_request(tokenizer.encode("the cat sat"), 4, out))
  scheduler._take_inbox(block=False)
  prefill_call = engine.prefill_call

  def fails(*args):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

  engine.prefill_call = fails
  try:
    with pytest.raises(RuntimeError):
      scheduler._round()
    scheduler._fail_all("engine failure: RuntimeError")  # what the scheduler's loop does next
  finally:
    engine.prefill_call = prefill_call
  for out in outputs:
    assert len(out) == 1 and out[0].finish_reason == "error"


def test_a_round_waits_briefly_for_arrivals_only_while_the_device_is_busy_and_slots_are_free(setup, tokenizer):
  # A client whose answer just ended sends its next request a few ms later: if it arrives while
  # the device still runs the call in flight, it joins the next call rather than the one after.
  _, _, engine = setup
  scheduler = Scheduler(engine, tokenizer, tokenizer.eos_ids)
  running = concurrent.futures.Future()  # a decode call the device thread is still in
  arrived = _request([1, 2], 4, [])
  scheduler._inbox.put(arrived)

  scheduler._await_arrivals()  # nothing in flight: the device is idle, the round goes on at once
  assert scheduler._waiting == [] and scheduler._inbox.qsize() == 1

  scheduler._inflight = [([], running, 1, True)]
  scheduler._owners = [object()] * engine.max_batch  # every slot taken: nobody could join
  scheduler._await_arrivals()
  assert scheduler._waiting == [] and scheduler._inbox.qsize() == 1

  scheduler._owners[-1] = None
  scheduler._await_arrivals()  # a free slot and a busy device: the request is taken in
  assert scheduler._waiting == [arrived] and scheduler._inbox.qsize() == 0

  # Two more slots free and two more requests in: all three are taken in, not the first alone.
  scheduler._owners[-3:] = [None] * 3
  more = [_request([3], 2, []), _request([4], 2, [])]
  for request in more:
    scheduler._inbox.put(request)
  scheduler._await_arrivals()
  assert scheduler._waiting == [arrived, *more] and scheduler._inbox.qsize() == 0
  running.set_result(None)


def test_a_failed_call_raises_even_when_none_of_its_rows_is_wanted(setup, tokenizer):
  # Its requests ended (EOS, a stop string, a cancel) before it was read; the call still failed,
  # and the state it took is gone: the error must reach the scheduler's loop (which fails the
  # requests in flight and resets the state), not surface on some later request's call.
  _, _, engine = setup
  scheduler = Scheduler(engine, tokenizer, tokenizer.eos_ids)
  ended = _Live(_request([1, 2], 4, []), 0, tokenizer, tokenizer.eos_ids)
  ended.finish_reason = "stop"
  failed = concurrent.futures.Future()
  failed.set_exception(RuntimeError("RESOURCE_EXHAUSTED: out of memory"))
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    scheduler._read(([(0, ended)], failed, 1, True))



class _Undecodable:
  """A tokenizer that cannot turn one id into text (as SentencePiece, an id past its pieces)."""

  def __init__(self, tokenizer, bad_id):
    self.tokenizer, self.bad_id = tokenizer, bad_id

  def decode(self, ids):
    if self.bad_id in ids:
      raise IndexError("piece id is out of range.")
    return self.tokenizer.decode(ids)

  def __getattr__(self, name):
    return getattr(self.tokenizer, name)


def test_a_request_whose_text_cannot_be_decoded_fails_alone(setup, tokenizer):
  # Its error must not become an engine failure, which would fail every request in flight.
  cfg, params, engine = setup
  good_prompt = tokenizer.encode("the cat sat")
  expected = generate_tokens(cfg, params, [good_prompt], 6)[0]
  bad_id = next(i for i in range(3, tokenizer.vocab_size) if i not in expected)  # in no answer of the good one
  scheduler = Scheduler(engine, _Undecodable(tokenizer, bad_id), tokenizer.eos_ids)
  scheduler._state = engine.init()
  bad, good = [], []
  scheduler.submit(_request(tokenizer.encode("a big dog") + [bad_id], 6, bad))  # decoded with its answer
  scheduler.submit(_request(good_prompt, 6, good))
  rounds = 0
  while any(not out or out[-1].finish_reason is None for out in (bad, good)):
    scheduler._take_inbox(block=False)
    scheduler._round()
    rounds += 1
    assert rounds < 50
  assert bad[-1].finish_reason == "error" and "IndexError" in bad[-1].error
  assert [t for o in good for t in o.tokens] == expected and good[-1].finish_reason == "length"
  stats = scheduler.stats()
  assert stats["errors"] == 1 and stats["finished"] == 1 and stats["live"] == 0


def test_a_failed_call_answers_the_requests_whose_last_tokens_it_carried(setup, tokenizer):
  # A request whose max_tokens the call in flight reaches gives its slot up before the call is read;
  # if that call fails, the request must still get its error answer (its client would wait forever).
  _, _, engine = setup
  scheduler = Scheduler(engine, tokenizer, tokenizer.eos_ids)
  scheduler._state = engine.init()
  outputs = []
  scheduler.submit(_request(tokenizer.encode("the cat sat"), 2, outputs))  # steps 2: one decode call
  generate = engine.generate

  def fails(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

  engine.generate = fails
  try:
    with pytest.raises(RuntimeError):
      for _ in range(3):
        scheduler._take_inbox(block=False)
        scheduler._round()
    assert scheduler._owners == [None] * engine.max_batch  # it gave its slot up already
    scheduler._fail_all("engine failure: RuntimeError")  # what the scheduler's loop does next
  finally:
    engine.generate = generate
  assert outputs[-1].finish_reason == "error" and sum(o.finish_reason is not None for o in outputs) == 1


@pytest.mark.parametrize("style", ["sentencepiece", "byte-level"])
def test_a_token_s_logprob_bytes_are_its_own_even_when_it_is_part_of_a_character(tokenizer, tmp_path, style):
  # "€" (E2 82 AC), seen in neither tokenizer's training text, is three tokens of a byte each:
  # SentencePiece's byte-fallback pieces <0xE2> <0x82> <0xAC>, byte-level BPE's "â" "Ĥ" "¬".
  # OpenAI's `bytes` of each is that byte; its `token` is the byte read as text (U+FFFD).
  tok = tokenizer if style == "sentencepiece" else Tokenizer(write_hf_tokenizer(tmp_path, "chatml"))
  ids = tok.encode("the € cat 😀", bos=False)
  entries, context = [], None
  for token in ids:
    entries.append(TokenLogprob(token, *token_text(tok, frozenset(tok.eos_ids), context, token), -1.0))
    context = token
  content = Server.chat_logprobs(entries)["content"]
  raw = [bytes(entry["bytes"]) for entry in content]
  assert [r for r in raw if r in (b"\xe2", b"\x82", b"\xac")] == [b"\xe2", b"\x82", b"\xac"]
  assert b"".join(raw) == tok.decode(ids).encode("utf-8")  # the answer's text, byte for byte
  for entry, r in zip(content, raw):
    assert entry["token"] == r.decode("utf-8", errors="replace")


def test_stop_scanner_finds_and_holds_back_as_the_definitions_say():
  # Against the definitions, on texts fed in random pieces: the earliest start of any stop string
  # (str.find, earliest over the stops), and, until one is found, the held-back tail: the longest
  # n < len(stop) over the stops with the text ending in stop[:n].
  import random

  from llama_jax.serve.stop_strings import StopScanner
  rng = random.Random(0)
  for _ in range(3000):
    letters = rng.choice(["ab", "abc", "a b", "aab"])
    text = "".join(rng.choice(letters) for _ in range(rng.randint(0, 24)))
    stops = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 3))]
    scanner, end = StopScanner(stops), 0
    while True:
      seen = text[:end]
      hits = [i for i in (seen.find(s) for s in stops) if i >= 0]
      assert scanner.feed(seen) == (min(hits) if hits else None), (seen, stops)
      if hits:
        break
      held = max(next((n for n in range(min(len(s) - 1, end), 0, -1) if seen.endswith(s[:n])), 0) for s in stops)
      assert scanner.held == held, (seen, stops)
      if end == len(text):
        break
      end = min(len(text), end + rng.randint(1, 4))


def test_stop_scanner_is_linear_in_what_it_reads():
  # A long periodic stop string that the answer keeps almost matching (the worst case of the
  # search it replaced): counted in character comparisons, not timed.
  from llama_jax.serve import stop_strings

  class Counting(str):
    reads = 0

    def __getitem__(self, i):
      Counting.reads += 1
      return str.__getitem__(self, i)

  stop = Counting("ab" * 4000 + "c")
  scanner = stop_strings.StopScanner([stop])
  text = ""
  for _ in range(2000):
    text += "ab" * 2 + ("a" if _ % 7 == 0 else "")
    scanner.feed(text)
  assert scanner.found is None
  assert Counting.reads < 4 * len(text), (Counting.reads, len(text))
