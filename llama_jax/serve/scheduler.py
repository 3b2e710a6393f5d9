"""The scheduler: which requests hold the engine's slots, when prompts are prefilled, and what each
request has produced so far. Plain Python on one thread, with a queue in and callbacks out, and
a second thread that makes the device calls in the order they are asked for (on a GPU a decode
call whose rows sample returns only once its loop has run: see `Scheduler.__init__`).

JetStream's orchestrator (`jetstream/core/orchestrator.py`) in one thread instead of its prefill,
generate and detokenize threads. Each round
  0. while the device runs the call in flight and slots are free, takes in the requests that
     arrive for a part of that call's time (`_await_arrivals`): they join the next call, not the
     one after;
  1. admits waiting requests into free slots, prefilled together (`SlotEngine.prefill_into`: the
     round's new prompts packed into a few batched calls that write straight into their slots,
     queued on the device behind the running call; a bounded number of prompt tokens per round,
     so the others never stall long). JetStream prefills one prompt per call; vLLM's scheduler, like this
     one, spends a per-round token budget on the waiting prompts together;
  2. dispatches a `generate` call for the live slots (to the device thread): `steps` decode steps,
     or up to `max_steps` while no request waits and no slot would idle long (`_steps_for`), over
     the part of the cache the live slots fill (`need`);
  3. while the device runs it, reads what was dispatched before (the previous call's tokens, the
     new requests' first tokens), turns tokens into text and ends requests: EOS, `max_tokens`, a
     stop string, a cancel.
So the device always has the next call queued while the host works. A request whose last token is
already in flight gives its slot up before the next call; one that ends otherwise (EOS, a stop
string, a cancel) has been given one more call's steps by the time the host knows, and those tokens
are dropped (JetStream accepts the same).

Text: each request has a `TextStreamer` (incremental detokenization) and a stop-string check that
holds back any tail that could still become a stop string, so the deltas it emits concatenate to
exactly the final text, streamed or not.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import secrets
import threading
import time
from typing import Callable, Sequence

import numpy as np

from llama_jax.generate import sampling
from llama_jax.generate import slots as slot_engine
from llama_jax.generate.streaming import TextStreamer
from llama_jax.serve.stop_strings import StopScanner
from llama_jax.tokenizer.byte_level import CHAR_TO_BYTE

log = logging.getLogger(__name__)

_WAKE = object()  # put in the inbox to make an idle loop look again (cancel, resume, stop)
# How long a round may wait for new requests while the device is busy with the call in flight
# and slots are free (`Scheduler._await_arrivals`): a client whose answer just ended sends its
# next request within a few milliseconds (more through HTTP under load); a decode call runs for
# tens of them. At least ARRIVAL_GRACE_S, and up to ARRIVAL_SHARE of a decode call's time (the
# round starts as the call in flight starts; the rest of it is left for the round's work and the
# next dispatch, which must reach the device before that call ends).
ARRIVAL_GRACE_S = 0.005
ARRIVAL_SHARE = 0.4


@dataclasses.dataclass
class TokenLogprob:
  token: int
  text: str  # the token's own text, as it reads after the token before it
  raw: bytes  # its bytes; a byte-fallback piece (<0xE2>) is that byte, though alone no character
  logprob: float
  offset: int = 0  # characters of the answer's token texts before it
  top: list["TokenLogprob"] = dataclasses.field(default_factory=list)  # the likeliest, best first


def token_text(tokenizer, eos_ids: frozenset[int], context: int | None, token: int) -> tuple[str, bytes]:
  """(text, bytes) of one token after `context` (the token before it, None at the start). A token
  that is part of a character has no text of its own: its bytes are its piece's, its text those
  bytes read as UTF-8 (U+FFFD for the unfinished character), as OpenAI's `bytes` and `token` are."""
  if token in eos_ids:
    return "", b""
  piece = tokenizer.id_to_piece(token) if hasattr(tokenizer, "id_to_piece") else ""
  raw = _partial_character(tokenizer, token, piece)
  if raw is not None:
    return raw.decode("utf-8", errors="replace"), raw
  text = tokenizer.decode_continuation([] if context is None else [context], [token])
  return text, text.encode("utf-8")


def _partial_character(tokenizer, token: int, piece: str) -> bytes | None:
  """The bytes of a token that is not whole characters (decoded alone, the tokenizer would give
  U+FFFD, whose bytes are not the token's), None for any other token."""
  if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece's byte fallback
    return bytes([int(piece[3:5], 16)])
  if not piece or any(c not in CHAR_TO_BYTE for c in piece):
    return None
  raw = bytes(CHAR_TO_BYTE[c] for c in piece)
  try:
    raw.decode("utf-8")
    return None  # whole characters: its text (with the space its context gives it) says it all
  except UnicodeDecodeError:
    pass
  # A piece of such characters is bytes only to a byte-level tokenizer: to another ("Ã" in a
  # SentencePiece vocabulary) it is text, and decodes to itself, not to those bytes' U+FFFD.
  return raw if tokenizer.decode([token]) == raw.decode("utf-8", errors="replace") else None


@dataclasses.dataclass
class Output:
  """One event of a request, in order: new text (possibly empty), the tokens it came from (counted
  ones only) and, on the last event, why it ended and the usage counts."""
  text: str
  tokens: list[int]
  logprobs: list[TokenLogprob] | None = None
  finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "error"
  prompt_tokens: int = 0
  completion_tokens: int = 0
  error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
  """What a client asked for, checked by the HTTP layer. `emit` is called on the scheduler's
  thread with each `Output`; it must not block."""
  prompt: list[int]
  max_tokens: int
  emit: Callable[[Output], None]
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None  # None: a fresh random seed
  stop: Sequence[str] = ()
  logprobs: int | None = None  # alternatives per token (0..20); None: no log-probabilities
  ignore_eos: bool = False  # go on to max_tokens past EOS ids (benchmarks)
  # Ids that end this answer besides the tokenizer's EOS ids, and are no text of it: a chat
  # template's end of turn (ChatML's <|im_end|> is no EOS to some tokenizers).
  stop_ids: frozenset[int] = frozenset()
  # A chat answer is text of its own (no space before its first word); a completion continues
  # its prompt's text (the space kept, as `Model.generate` returns it).
  continues_prompt: bool = True
  cancelled: bool = False  # set by `Scheduler.cancel` from any thread


class _Live:
  """The host's record of one admitted request."""

  def __init__(self, request: Request, slot: int, tokenizer, eos_ids: frozenset[int]):
    self.request, self.slot = request, slot
    self.end_ids = frozenset(eos_ids) | frozenset(request.stop_ids)  # the ids that end the answer
    context = request.prompt if request.continues_prompt else []
    self.streamer = TextStreamer(tokenizer, lambda _: None, self.end_ids, context)
    self.stops = StopScanner(request.stop)  # fed the streamer's text after each token
    self.last_token = context[-1] if context else None  # for each token's own text (logprobs)
    self.text_offset = 0
    self.dispatched = 1  # tokens asked of the device so far (the first comes with the prefill)
    self.count = 0  # tokens read and counted towards completion_tokens
    self.emitted = 0  # characters of streamer.text already sent
    self.final_len: int | None = None  # where the text ends, once a stop string is found
    self.finish_reason: str | None = None

  @property
  def done(self) -> bool:
    return self.finish_reason is not None


def _fetch_early(step: slot_engine.Step) -> None:
  """Asks for a call's outputs on the host as soon as the device has them (as JetStream's generate
  thread does), so reading them later does not wait for the copy after the computation."""
  for array in step:
    if array is not None:
      array.copy_to_host_async()


class Scheduler:
  """Runs `engine` (a `slots.SlotEngine`) for the requests `submit`ted to it, on its own thread."""

  def __init__(self, engine: slot_engine.SlotEngine, tokenizer, eos_ids: Sequence[int],
               prefill_tokens_per_round: int | None = None):
    self.engine, self.tokenizer = engine, tokenizer
    self.eos_ids = frozenset(int(i) for i in eos_ids)
    # Default: what one batched prefill call takes, so a round's admissions are about one call.
    self.prefill_tokens_per_round = prefill_tokens_per_round or engine.prefill_tokens
    self._inbox: queue.Queue = queue.Queue()
    self._waiting: list[Request] = []
    self._owners: list[_Live | None] = [None] * engine.max_batch
    # Device results not yet read, in dispatch order: ([(row, request's record)], the call's future
    # slots.Step, how many of its tokens per row were drawn, whether it is a decode call).
    self._inflight: list[tuple[list[tuple[int, _Live]], concurrent.futures.Future, int, bool]] = []
    # The device calls run on a thread of their own, in the order they are submitted, and only
    # that thread touches the engine's state: on a GPU a decode call whose loop has a branch in
    # it (the sampler's, for rows that sample) or a trip count that is data is driven from the
    # host, so the call returns only when the device is done with it; were it made here, the host
    # could not read one call's tokens while the next one runs. (An all-greedy call of a compiled
    # length returns at once: the thread then queues the next calls while the device runs it.)
    self._device = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llama_jax-device")
    self._last_call: concurrent.futures.Future | None = None
    self._state = None
    self._running = threading.Event()
    self._running.set()
    self._stopping = False
    self._changed = threading.Condition()
    self._counts = dict(admitted=0, finished=0, cancelled=0, cancel_calls=0, errors=0)
    # Where the engine's time goes, for /health and the load benchmark: decode calls, their steps,
    # live slots x steps against the row bucket's rows x steps (the rest computes idle slots), the
    # attention window read; batched prefill calls and their padded tokens against the prompts'
    # own; the seconds the scheduler's thread spent in rounds and, inside them, blocked on the device.
    self._work = dict(decode_calls=0, decode_steps=0, live_slot_steps=0, row_steps=0, attend_steps=0,
                      prefill_calls=0, prefill_tokens_padded=0, prompt_tokens=0, round_s=0.0,
                      device_wait_s=0.0)
    # When the last decode call's tokens were read, and a running mean of the time between two such
    # reads (under load: what a decode call takes on the device), for `_await_arrivals`.
    self._last_decode_read: float | None = None
    self._decode_call_s = 0.0
    self._thread = threading.Thread(target=self._loop, name="llama_jax-scheduler", daemon=True)

  # --- any thread

  def start(self) -> "Scheduler":
    self._state = self.engine.init()
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stopping = True
    self._running.set()
    self._inbox.put(_WAKE)
    self._thread.join()
    self._device.shutdown(wait=True)

  def submit(self, request: Request) -> None:
    if any(not s for s in request.stop):  # (the HTTP layer refuses them with a 400 first)
      raise ValueError("stop strings must not be empty")
    self._inbox.put(request)

  def cancel(self, request: Request) -> None:
    """The client is gone: free its slot (or drop it from the queue) at the next round."""
    if not request.cancelled:
      request.cancelled = True
      self._bump("cancel_calls")
      self._inbox.put(_WAKE)

  def pause(self) -> None:
    """No more decode steps until `resume` (admission and prefill go on). For tests that need a
    request to stay live, and for draining."""
    self._running.clear()

  def resume(self) -> None:
    self._running.set()
    self._inbox.put(_WAKE)

  def stats(self) -> dict[str, int]:
    with self._changed:
      live = sum(o is not None for o in self._owners)
      return dict(self._counts, live=live, waiting=len(self._waiting) + self._inbox.qsize(),
                  slots=len(self._owners), **{k: round(v, 4) for k, v in self._work.items()})

  def wait_until(self, predicate: Callable[[dict], bool], timeout: float | None = None) -> bool:
    """Blocks until predicate(stats()) holds (or the timeout passes); its value."""
    with self._changed:
      return self._changed.wait_for(lambda: predicate(self.stats()), timeout)

  # --- the scheduler's thread

  def _bump(self, name: str, n: int = 1) -> None:
    with self._changed:
      self._counts[name] += n
      self._changed.notify_all()

  def _loop(self) -> None:
    while not self._stopping:
      self._take_inbox(block=self._idle())
      self._await_arrivals()
      if self._stopping:
        break
      try:
        start = time.perf_counter()
        self._round()
        self._work["round_s"] += time.perf_counter() - start
      except Exception as e:  # pylint: disable=broad-except
        # A failed device call (out of memory, a bug): every request in flight gets an error,
        # the slots start over, and the server goes on serving.
        log.exception("engine failure; failing the requests in flight")
        self._fail_all(f"engine failure: {type(e).__name__}: {e}")
      with self._changed:
        self._changed.notify_all()
    self._fail_all("the server is shutting down")

  def _idle(self) -> bool:
    live = any(o is not None for o in self._owners)
    admissible = self._waiting and None in self._owners
    return not self._inflight and not admissible and not (live and self._running.is_set())

  def _device_busy(self) -> bool:
    """Whether the last decode call dispatched is still running (or queued) on the device."""
    if not self._inflight:
      return False
    call = self._inflight[-1][1]
    if not call.done():  # the device thread is still in it (on a GPU: until its loop has run)
      return True
    return call.exception() is None and not call.result().tokens.is_ready()

  def _await_arrivals(self) -> None:
    """Before a round: while slots are free and the device still runs the call in flight, take in
    the requests that come meanwhile, for up to ARRIVAL_GRACE_S or ARRIVAL_SHARE of a decode
    call, whichever is longer. Those that arrive then join the next call instead of the one after
    it (their slots would otherwise idle through a whole call); the wait costs the device nothing,
    as it is busy meanwhile and the next call is dispatched before this one ends."""
    free = self._owners.count(None)
    if len(self._waiting) >= free:
      return
    deadline = time.perf_counter() + max(ARRIVAL_GRACE_S, ARRIVAL_SHARE * self._decode_call_s)
    while time.perf_counter() < deadline and len(self._waiting) < free and self._device_busy():
      try:  # looked at every millisecond
        item = self._inbox.get(timeout=0.001)
      except queue.Empty:
        continue
      if item is not _WAKE:
        self._waiting.append(item)
      self._take_inbox(block=False)

  def _take_inbox(self, block: bool) -> None:
    try:
      item = self._inbox.get(block=block)
      while True:
        if item is not _WAKE:
          self._waiting.append(item)
        item = self._inbox.get_nowait()
    except queue.Empty:
      pass

  def _round(self) -> None:
    for live in self._owners:
      if live is None:
        continue
      if live.request.cancelled:
        self._free(live, cancelled=True)
      elif live.dispatched >= live.request.max_tokens:
        # Its last token is already being made: the slot is free for the next request now, and
        # the tokens in flight are still read (they are the call's outputs, not the slot's).
        self._owners[live.slot] = None
    self._admit()
    live = [(s, o) for s, o in enumerate(self._owners) if o is not None]
    dispatched = []
    if self._running.is_set() and live:
      wants_top = any(o.request.logprobs for _, o in live)
      k = slot_engine.max_top_logprobs(self.engine.cfg) if wants_top else 0
      steps = self._steps_for([o for _, o in live])
      # One past the last position a live slot feeds in this call (a request's tokens past its
      # max_tokens are never read, so its positions past that need no window).
      need = max(len(o.request.prompt) + min(o.dispatched + steps, o.request.max_tokens) - 1
                 for _, o in live)
      rows = self.engine.rows_for(live[-1][0] + 1)
      # All greedy: a call without the sampler's branches, which returns before the device is done.
      greedy = all(o.request.temperature == 0 for _, o in live)
      call = self._on_device(self._generate, rows, k, steps, need, greedy)
      w = self._work
      w["decode_calls"] += 1
      w["decode_steps"] += steps
      w["live_slot_steps"] += steps * len(live)
      w["row_steps"] += steps * (self.engine.max_batch if k else rows)
      w["attend_steps"] += steps * self.engine.attend_for(rows, k, need)
      for _, o in live:
        o.dispatched += steps
      dispatched = [(live, call, steps, True)]
    # The device runs the step just dispatched while the host reads what came before it (the
    # previous step, and the first tokens of the requests just admitted). Each entry stays listed
    # until it is read: if its call failed, `_fail_all` answers its requests (those whose last
    # tokens it carried hold no slot any more) and those of the entries after it.
    pending = len(self._inflight)
    self._inflight += dispatched
    for _ in range(pending):
      self._read(self._inflight[0])
      self._inflight.pop(0)

  # --- the device thread

  def _on_device(self, fn, *args) -> concurrent.futures.Future:
    self._last_call = self._device.submit(fn, *args)
    return self._last_call

  def _slots(self) -> slot_engine.Slots:
    if self._state is None:  # a reset after a failure failed (out of memory): try again
      self._state = self.engine.init()
    return self._state

  def _generate(self, rows: int, top_logprobs: int, steps: int, need: int, greedy: bool) -> slot_engine.Step:
    self._state, step = self.engine.generate(self._slots(), rows=rows, top_logprobs=top_logprobs,
                                             steps=steps, need=need, greedy=greedy)
    _fetch_early(step)
    return step

  def _prefill(self, args: tuple) -> slot_engine.Step:
    self._state, drawn = self.engine.prefill_call(self._slots(), args)
    _fetch_early(drawn)
    return drawn

  def _reset(self) -> None:
    self._state = None  # the old cache goes before the new one is allocated
    self._state = self.engine.init()

  # --- the scheduler's thread, again

  def _steps_for(self, live: list[_Live]) -> int:
    """Decode steps for the next call: the engine's `steps`, or a multiple of it up to `max_steps`
    while nobody waits for a slot and the longer call leaves slots idle for at most an eighth of
    its slot-steps (a slot whose request reaches max_tokens mid-call idles for the rest of it; one
    that meets EOS or a stop string early is not foreseen). Fewer, longer calls: less host work
    per token, and the device queue stays ahead of the host. (Also counting a slot freed mid-call
    as idle through the next call, as it is under closed-loop load, was tried: at 64 clients on the
    CPU, calls fell from 28 to 12.5 steps while live rows rose only from 67.8% to 69.4%, and a call
    costs ~2.6 ms beyond its steps on an H200, estimated as 27 x (1.826 - 1.729) ms: the server's
    27-step calls against the static batch's steps at the same window. Reverted.)"""
    lengths = self.engine.call_lengths  # the engine's steps, doubled up to its max_steps
    best = lengths[0]
    if self._waiting:
      return best
    for steps in lengths[1:]:
      idle = sum(max(0, steps - (o.request.max_tokens - o.dispatched)) for o in live)
      if idle * 8 > steps * len(live):
        break
      best = steps
    return best

  def _admit(self) -> None:
    """Waiting requests into free slots, lowest first, prefilled together; while others decode, no
    more than the round's prompt-token budget (they wait for these prefills)."""
    budget = self.prefill_tokens_per_round
    decoding = any(o is not None for o in self._owners)
    admitted: list[_Live] = []
    seeds = []
    free = [s for s, o in enumerate(self._owners) if o is None]
    while self._waiting and free and (budget > 0 or not decoding):
      request = self._waiting.pop(0)
      if request.cancelled:
        self._bump("cancelled")
        continue
      refused = self._refusal(request)
      if refused:  # (the HTTP layer checks first) one bad request must not fail the round's others
        self._deliver(request, Output("", [], finish_reason="error", error=refused))
        self._bump("errors")
        continue
      slot = free.pop(0)
      seeds.append(secrets.randbits(32) if request.seed is None else request.seed)
      admitted.append(_Live(request, slot, self.tokenizer, self.eos_ids))
      budget -= len(request.prompt)
    if not admitted:
      return
    # Owned before the device call: if it raises, `_fail_all` answers these requests with the rest.
    for live in admitted:
      self._owners[live.slot] = live
    requests = [live.request for live in admitted]
    plan = self.engine.prefill_plan([r.prompt for r in requests], seeds,
                                    [(r.temperature, r.top_k, r.top_p) for r in requests],
                                    [live.slot for live in admitted])
    self._work["prefill_calls"] += len(plan)
    self._work["prompt_tokens"] += sum(len(r.prompt) for r in requests)
    for chosen, args in plan:
      self._work["prefill_tokens_padded"] += args.tokens.size  # the call's (rows, length) tokens
      self._inflight.append(([(row, admitted[i]) for row, i in enumerate(chosen)],
                             self._on_device(self._prefill, args), 1, False))
    self._bump("admitted", len(admitted))

  def _refusal(self, request: Request) -> str | None:
    """Why the engine would refuse a request (its prompt, its sampling settings), if it would."""
    try:
      self.engine.check_prompt(request.prompt)
      sampling.check(request.temperature, request.top_k, request.top_p)
    except (ValueError, TypeError) as e:
      return str(e)
    return None

  def _read(self, entry) -> None:
    rows, call, count, decode = entry
    for _, live in rows:
      if live.request.cancelled and not live.done:
        self._free(live, cancelled=True)
    rows = [(r, live) for r, live in rows if not live.done]
    start = time.perf_counter()
    # Waits for the device, and raises what the call raised even when none of its rows is wanted
    # any more: a failed call (its state lost) must fail the requests in flight, not the next ones.
    drawn = call.result()
    if not rows:
      return
    tokens, logprobs = np.asarray(drawn.tokens), np.asarray(drawn.logprobs)
    now = time.perf_counter()
    self._work["device_wait_s"] += now - start
    if decode:  # (a gap of over a second is the server idle, not a call)
      if self._last_decode_read is not None and now - self._last_decode_read < 1.0:
        self._decode_call_s += 0.2 * (now - self._last_decode_read - self._decode_call_s)
      self._last_decode_read = now
    top = None
    if drawn.top_tokens is not None and any(live.request.logprobs for _, live in rows):
      top = np.asarray(drawn.top_tokens), np.asarray(drawn.top_logprobs)
    for r, live in rows:
      top_r = None if top is None else (top[0][r, :count], top[1][r, :count])
      try:
        self._consume(live, tokens[r, :count], logprobs[r, :count], top_r)
      except Exception as e:  # pylint: disable=broad-except
        # Turning its tokens into text failed (a tokenizer that cannot decode an id): that request
        # alone ends, with an error; the engine and the others are fine.
        log.exception("could not turn a request's tokens into text; failing it")
        self._fail(live, f"could not decode the answer: {type(e).__name__}: {e}")

  def _consume(self, live: _Live, tokens: np.ndarray, logprobs: np.ndarray, top) -> None:
    """A request's next tokens: counted up to its end, turned into text, emitted."""
    request = live.request
    counted: list[int] = []
    for token in tokens.tolist():
      counted.append(token)
      live.count += 1
      if token in live.end_ids and not request.ignore_eos:
        live.finish_reason = "stop"
        break
      if request.stop:  # token by token only where a stop string could end the text mid-chunk
        live.streamer([token])
        if self._stop_found(live):
          live.finish_reason = "stop"
          break
      if live.count >= request.max_tokens:
        live.finish_reason = "length"
        break
    if not request.stop:
      live.streamer([t for t in counted if t not in live.end_ids])
    if live.done and live.final_len is None:
      live.streamer.flush()  # an unfinished character at the very end
      if request.stop and self._stop_found(live):
        live.finish_reason = "stop"
    token_logprobs = None
    if request.logprobs is not None:
      token_logprobs = [self._token_logprob(live, t, token, logprobs, top) for t, token in enumerate(counted)]
    self._emit(live, counted, token_logprobs)
    if live.done:
      self._free(live)

  def _token_logprob(self, live: _Live, t: int, token: int, logprobs, top) -> TokenLogprob:
    context = live.last_token
    entry = TokenLogprob(token, *token_text(self.tokenizer, live.end_ids, context, token),
                         float(logprobs[t]), live.text_offset)
    if top is not None:
      n = live.request.logprobs
      for alt, value in zip(top[0][t, :n].tolist(), top[1][t, :n].tolist()):
        entry.top.append(TokenLogprob(alt, *token_text(self.tokenizer, live.end_ids, context, alt), value,
                                      live.text_offset))
    live.last_token = token
    live.text_offset += len(entry.text)
    return entry

  def _stop_found(self, live: _Live) -> bool:
    live.final_len = live.stops.feed(live.streamer.text)
    return live.final_len is not None

  def _sendable_end(self, live: _Live) -> int:
    """How much of the text can go out: all of it once the request is done; before that, all but
    a tail that is the beginning of some stop string."""
    text = live.streamer.text
    if live.final_len is not None:
      return live.final_len
    if live.done:
      return len(text)
    return len(text) - live.stops.held

  def _emit(self, live: _Live, tokens: list[int], logprobs: list[TokenLogprob] | None) -> None:
    end = max(self._sendable_end(live), live.emitted)
    text = live.streamer.text[live.emitted:end]
    live.emitted = end
    if not (text or tokens or live.done):
      return
    final = live.done
    out = Output(text, tokens, logprobs, live.finish_reason if final else None,
                 len(live.request.prompt) if final else 0, live.count if final else 0)
    self._deliver(live.request, out)

  def _deliver(self, request: Request, out: Output) -> None:
    try:
      request.emit(out)
    except Exception:  # pylint: disable=broad-except
      log.exception("a request's output callback failed; cancelling it")
      request.cancelled = True

  def _free(self, live: _Live, cancelled: bool = False) -> None:
    if self._owners[live.slot] is live:  # (a request at its token limit gave its slot up already)
      self._owners[live.slot] = None
    if live.finish_reason is None:
      live.finish_reason = "cancelled"
    self._bump("cancelled" if cancelled else "finished")

  def _fail(self, live: _Live, message: str) -> None:
    """One admitted request ends with an error; its slot is free."""
    if self._owners[live.slot] is live:
      self._owners[live.slot] = None
    live.finish_reason = "error"
    self._deliver(live.request, Output("", [], finish_reason="error", error=message))
    self._bump("errors")

  def _fail_all(self, message: str) -> None:
    self._take_inbox(block=False)
    # Every unfinished request: those holding slots, those whose last tokens are in flight (they
    # gave their slots up already), and those waiting.
    admitted = [live for live in self._owners if live is not None]
    admitted += [live for rows, *_ in self._inflight for _, live in rows]
    admitted = [live for live in dict.fromkeys(admitted) if not live.done]
    for live in admitted:
      live.finish_reason = "error"
    failed = [live.request for live in admitted] + self._waiting
    for request in failed:
      self._deliver(request, Output("", [], finish_reason="error", error=message))
    self._owners = [None] * len(self._owners)
    self._waiting = []
    self._bump("errors", len(failed))
    self._inflight = []
    if self._last_call is not None:  # the calls still queued run (or fail) before the state resets
      concurrent.futures.wait([self._last_call])
    if not self._stopping:
      try:
        self._on_device(self._reset).result()
      except Exception:  # pylint: disable=broad-except
        log.exception("could not reset the engine's state; the next device call tries again")
