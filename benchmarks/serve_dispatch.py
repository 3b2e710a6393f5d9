"""Does a decode call of the server's engine return before the device finishes it? And what does a
step cost at full load, by attention window?

  python benchmarks/serve_dispatch.py [--preset tinyllama_1b] [--rows 64] [--windows 512,1024]

The scheduler dispatches a `generate` call, then reads the previous call's tokens while the device
runs; that overlap needs the call to return at once. A loop whose trip count is data (`count`)
is a while loop, which XLA's GPU runtime may drive from the host (a predicate copied back each
iteration). This times, for `SlotEngine.generate` at `--rows` live slots (prompts of 227 tokens
prefilled into every slot, the serving benchmark's mean) and each window: how long the Python call
takes to return, how long until its outputs are ready, and ms per step over back-to-back calls.
Random weights; one JSON line per window.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_load  # noqa: E402  (the random model)

import llama_jax  # noqa: E402
from llama_jax.bench.common import device_info  # noqa: E402
from llama_jax.generate.slots import SlotEngine  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="tinyllama_1b")
  p.add_argument("--rows", type=int, default=64)
  p.add_argument("--cache_len", type=int, default=1024)
  p.add_argument("--prompt_len", type=int, default=227)
  p.add_argument("--steps", type=int, default=27, help="decode steps per call (of max_steps 32)")
  p.add_argument("--windows", default="512,1024")  # with XLA's decode attention; the Pallas one reads the whole cache
  p.add_argument("--calls", type=int, default=8)
  p.add_argument("--decode_attention", default="auto", help="comma separated: auto, xla, pallas")
  p.add_argument("--static_steps", default="1", help="comma separated 1 (a program per call length: "
                 "--steps must be 8, 16 or 32 for it) or 0 (the call length is data)")
  p.add_argument("--greedy", default="0", help="comma separated 1 (an all-greedy call: no sampler "
                 "branches in the loop) or 0 (the general sampler)")
  args = p.parse_args()
  cfg = llama_jax.preset(args.preset, dtype="bfloat16", param_dtype="bfloat16", scan_layers=False)
  params = serve_load.random_params(cfg)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, (args.rows, args.prompt_len)).tolist()
  first = None  # the first choice's greedy tokens of each window's first call, to compare the others with
  for choice, fixed in itertools.product(args.decode_attention.split(","), args.static_steps.split(",")):
    eng = SlotEngine(cfg, params, max_batch=args.rows, cache_len=args.cache_len, steps=8, max_steps=32,
                     decode_attention=choice, static_steps=bool(int(fixed)))
    state, _ = eng.prefill_into(eng.init(), prompts, list(range(args.rows)), [(0.0, 0, 1.0)] * args.rows,
                                list(range(args.rows)))
    for greedy in map(int, args.greedy.split(",")):  # each from where the one before left the slots
      tokens, state = time_calls(eng, state, args, first, bool(greedy))
    first = first or tokens
    del eng, state


def time_calls(eng, state, args, first, greedy: bool) -> tuple[dict, object]:
  """Times each window's calls (one JSON line a window): (its first call's tokens by window, the
  state after them)."""
  tokens = {}
  for window in map(int, args.windows.split(",")):
    # The first call compiles; it starts from the prefilled state only for the first window.
    state, step = eng.generate(state, rows=args.rows, steps=args.steps, need=window, greedy=greedy)
    tokens[window] = np.asarray(step.tokens)[:, :args.steps]
    agree = None if first is None else round(float(np.mean(tokens[window] == first[window])), 4)
    returned, ready = [], []
    for _ in range(args.calls):
      t0 = time.perf_counter()
      state, step = eng.generate(state, rows=args.rows, steps=args.steps, need=window, greedy=greedy)
      returned.append(time.perf_counter() - t0)
      jax.block_until_ready(step)
      ready.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(args.calls):  # back to back, as the scheduler would if nothing else ran
      state, step = eng.generate(state, rows=args.rows, steps=args.steps, need=window, greedy=greedy)
    dispatched = time.perf_counter() - t0
    jax.block_until_ready(step)
    total = time.perf_counter() - t0
    print(json.dumps({"rows": args.rows, "decode_attention": eng.cfg.decode_attention,
                      "static_count": args.steps in eng.call_lengths and eng.static_steps, "greedy": greedy,
                      "window": eng.attend_for(args.rows, 0, window), "steps": args.steps,
                      "call_returns_ms": round(1000 * float(np.median(returned)), 2),
                      "call_ready_ms": round(1000 * float(np.median(ready)), 2),
                      "back_to_back_dispatch_ms": round(1000 * dispatched, 1),
                      "back_to_back_total_ms": round(1000 * total, 1),
                      "ms_per_step": round(1000 * total / (args.calls * args.steps), 3),
                      "tokens_per_s": round(args.calls * args.steps * args.rows / total, 1),
                      "tokens_agree_with_first_choice": agree, **device_info()}), flush=True)
  return tokens, state


if __name__ == "__main__":
  main()
