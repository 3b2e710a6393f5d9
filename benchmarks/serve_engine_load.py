"""The server's scheduler and engine under load without HTTP: closed-loop clients in-process, the
device calls made on the scheduler's device thread (as served) and, for comparison, inline on the
scheduler's own thread (as before that thread existed), beside the static batch, in one process.

  python benchmarks/serve_engine_load.py [--clients 64] [--preset tinyllama_1b]

Same load as `serve_load.py` (its `mix`: prompts and answers log-normal around medians 200 and
160 tokens, token-id prompts, every answer exactly its `max_tokens`), same model shape with random
weights, `--max_batch` = clients, `--max_len 1024`. Each client's next request is submitted from
the callback that receives its previous answer's end (no HTTP, no streaming, no event loop): what
is left of the gap to the static batch is the scheduler's and the engine's. Windows from
`--min_attend` (512 by default: fewer programs to compile) with XLA's decode attention only; the
ragged Pallas kernel (the default on one GPU) reads each slot's own length and has no windows.
Warmup first (its seconds are reported: the warmup compiles on `--warmup_threads` threads), then
each mode twice (the first is untimed), one JSON line each; `engine_steady` is the scheduler's work until the last request is
sent (every client busy), `engine` the whole level with the drain at its end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_load  # noqa: E402  (the load's mix)

import llama_jax  # noqa: E402
from llama_jax.bench.common import device_info  # noqa: E402
from llama_jax.generate import engine, generate_tokens  # noqa: E402
from llama_jax.generate.slots import SlotEngine  # noqa: E402
from llama_jax.serve.scheduler import Request, Scheduler  # noqa: E402


class _Tokens:
  """Token ids as text (the scheduler decodes what it emits): each id its own word."""
  eos_ids = ()

  def decode(self, ids):
    return "".join(f" {i}" for i in ids)

  def decode_continuation(self, prompt_ids, new_ids):
    return self.decode(new_ids)


def _inline(self, fn, *args):
  """The scheduler's device calls on its own thread (the behaviour before the device thread)."""
  future = concurrent.futures.Future()
  try:
    future.set_result(fn(*args))
  except Exception as e:  # noqa: BLE001
    future.set_exception(e)
  return future


def run_level(scheduler: Scheduler, clients: int, prompts, answers) -> dict:
  queue = list(zip(prompts, answers))[::-1]
  lock, done = threading.Lock(), threading.Event()
  made = [0]
  outstanding = [0]
  last_sent = [0.0]
  at_last_send: list[dict] = []  # the scheduler's counters when the last request goes in

  def send():
    with lock:
      if not queue:
        return
      prompt, answer = queue.pop()
      outstanding[0] += 1
      last_sent[0] = time.perf_counter()
      if not queue:
        at_last_send.append(scheduler.stats())
    scheduler.submit(Request(prompt=prompt, max_tokens=answer, emit=on_output, ignore_eos=True))

  def on_output(out):
    if out.finish_reason is None:
      return
    with lock:
      made[0] += out.completion_tokens
      outstanding[0] -= 1
      finished = not queue and outstanding[0] == 0
    if finished:
      done.set()
    else:
      send()

  t0 = time.perf_counter()
  for _ in range(clients):
    send()
  done.wait()
  seconds = time.perf_counter() - t0
  return {"clients": clients, "requests": len(prompts), "tokens": made[0], "seconds": round(seconds, 2),
          "tokens_per_s": round(made[0] / seconds, 1), "steady_seconds": round(last_sent[0] - t0, 2),
          "at_last_send": at_last_send[0]}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="tinyllama_1b")
  p.add_argument("--clients", type=int, default=64)
  p.add_argument("--max_len", type=int, default=1024)
  p.add_argument("--min_attend", type=int, default=512)
  p.add_argument("--warmup_threads", type=int, default=0, help="0: the engine's default")
  p.add_argument("--modes", default="device_thread,inline")
  p.add_argument("--decode_attention", default="auto", help="comma separated: auto, xla, pallas (an "
                 "engine each, every mode on each)")
  p.add_argument("--static_steps", default="1", help="comma separated 1 (a program per call length) "
                 "or 0 (the call length is data): an engine each")
  p.add_argument("--pack_prompts", default="1", help="comma separated 1 (prompts packed side by side "
                 "in prefill rows) or 0 (one a row): an engine each")
  p.add_argument("--attention_impl", default="xla", help="comma separated: xla, cudnn (the model's "
                 "prefill attention; the static batch is measured again with each)")
  p.add_argument("--time_prefill", action="store_true", help="also time each compiled prefill shape alone")
  p.add_argument("--dtype", default="bfloat16")
  args, rest = p.parse_known_args()
  load = serve_load.parse_args(rest)
  context = max(llama_jax.preset(args.preset).max_seq_len, args.max_len)  # a small preset's, stretched
  tokenizer = _Tokens()
  count = serve_load.requests_for(load, args.clients)
  prompt_lengths, answers = serve_load.mix(load, count, seed=args.clients)
  params = None
  for impl in args.attention_impl.split(","):
    cfg = llama_jax.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, scan_layers=False,
                           max_seq_len=context, attention_impl=impl)
    params = params or serve_load.random_params(cfg)
    static = static_batch(cfg, params, args, load)
    prompts = serve_load.token_prompts(prompt_lengths, cfg.vocab_size, args.clients)
    for choice, fixed, pack in itertools.product(args.decode_attention.split(","), args.static_steps.split(","),
                                                 args.pack_prompts.split(",")):
      eng = SlotEngine(cfg, params, max_batch=args.clients, cache_len=args.max_len, min_attend=args.min_attend,
                       decode_attention=choice, static_steps=bool(int(fixed)), pack_prompts=bool(int(pack)))
      t0 = time.perf_counter()
      eng.warmup(threads=args.warmup_threads or None)
      print(json.dumps({"warmup_s": round(time.perf_counter() - t0, 1), **_engine_options(eng),
                        "programs": len(eng.prefill_shapes) + len(eng.generate_shapes)}), flush=True)
      if args.time_prefill:
        print(json.dumps({**_engine_options(eng), "prefill_ms": time_prefill(eng)}), flush=True)
      for mode in args.modes.split(","):
        run_mode(eng, mode, tokenizer, args, prompts, answers, static)
      del eng


def _engine_options(eng) -> dict:
  return {"attention_impl": eng.cfg.attention_impl, "decode_attention": eng.cfg.decode_attention,
          "static_steps": eng.static_steps, "pack_prompts": eng.pack_prompts}


def static_batch(cfg, params, args, load) -> float:
  """`generate_tokens`' tokens/s at the mix's mean lengths (as serve_load's), after an untimed call."""
  lengths, outs = serve_load.mix(load, 4096, seed=1)
  pl, n = int(np.mean(lengths)), int(np.mean(outs))
  rng = np.random.default_rng(2)
  static_prompts = rng.integers(3, cfg.vocab_size, (args.clients, pl)).tolist()
  prepared = engine.prepare_params(cfg, params)
  run = lambda: generate_tokens(cfg, prepared, static_prompts, n, batch_size=args.clients, eos_ids=())
  run()
  t0 = time.perf_counter()
  run()
  static = args.clients * n / (time.perf_counter() - t0)
  print(json.dumps({"attention_impl": cfg.attention_impl, "static_tokens_per_s": round(static, 1),
                    "prompt_len": pl, "new_tokens": n}), flush=True)
  return static


def time_prefill(eng, repeats: int = 5) -> dict[str, float]:
  """Milliseconds a compiled prefill call of each shape takes alone (its rows all padding, which
  costs what prompts do), the best of `repeats` calls each."""
  import jax
  state, times = eng.init(), {}
  for r, length in eng.prefill_shapes:
    call = eng.empty_prefill(r, length)
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      state, drawn = eng.prefill_call(state, call)
      jax.block_until_ready(drawn)
      best = min(best, time.perf_counter() - t0)
    times[f"{r}x{length}"] = round(1000 * best, 3)
  return times


def run_mode(eng, mode, tokenizer, args, prompts, answers, static) -> None:
  """One closed-loop level (after an untimed one) through a scheduler over `eng`: a JSON line."""
  scheduler = Scheduler(eng, tokenizer, ())
  if mode == "inline":
    scheduler._on_device = _inline.__get__(scheduler)
  scheduler.start()
  try:
    for timed in (False, True):
      before = scheduler.stats()
      row = run_level(scheduler, args.clients, prompts, answers)
      if timed:
        work = serve_load.engine_work(before, scheduler.stats(), row["seconds"])
        # While every client has a request in (until the last is sent): without the drain at the end.
        steady = serve_load.engine_work(before, row.pop("at_last_send"), row["steady_seconds"])
        # (its snapshot falls inside a round, so the thread's time shares would be off: left out)
        steady = {k: v for k, v in steady.items() if not k.startswith("host_")}
        print(json.dumps({"mode": mode, **_engine_options(eng), **row,
                          "vs_static": round(row["tokens_per_s"] / static, 3), "engine": work,
                          "engine_steady": steady, **device_info()}), flush=True)
  finally:
    scheduler.stop()


if __name__ == "__main__":
  main()
