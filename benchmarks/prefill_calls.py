"""What one batched prefill call of the server's engine costs, by shape: how long the Python call
takes to return (host dispatch), how long until its first tokens are ready, and the time a call
over back-to-back calls; optionally a trace of each shape's back-to-back calls.

  python benchmarks/prefill_calls.py [--shapes 1x16,1x256,4x256,1x1024,4x1024] [--pack_prompts 1,0]
      [--attention_impl cudnn] [--profile_dir DIR]

TinyLlama-1.1B shape, random bfloat16 weights, 64 slots of 1,024 positions (the serving benchmark's
engine). Each call's rows are full of padding (which costs what prompts do). One JSON line per
shape and packing; with --profile_dir, a trace of each one's back-to-back calls (`profile_summary.py
DIR/pack<N>_<R>x<L>`; traced calls run slower than the timed ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

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
  p.add_argument("--shapes", default="1x16,1x256,4x256,1x1024,4x1024")
  p.add_argument("--pack_prompts", default="1,0")
  p.add_argument("--attention_impl", default="cudnn")
  p.add_argument("--calls", type=int, default=10)
  p.add_argument("--profile_dir", default="")
  args = p.parse_args()
  cfg = llama_jax.preset(args.preset, dtype="bfloat16", param_dtype="bfloat16", scan_layers=False,
                         attention_impl=args.attention_impl)
  params = serve_load.random_params(cfg)
  shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
  for pack in map(int, args.pack_prompts.split(",")):
    eng = SlotEngine(cfg, params, max_batch=64, cache_len=min(1024, cfg.max_seq_len), pack_prompts=bool(pack))
    state = eng.init()
    calls = {shape: eng.empty_prefill(*shape) for shape in shapes}
    for call in calls.values():  # compile
      state, drawn = eng.prefill_call(state, call)
    jax.block_until_ready(drawn)
    for (r, length), call in calls.items():
      returned, ready = [], []
      for _ in range(args.calls):
        t0 = time.perf_counter()
        state, drawn = eng.prefill_call(state, call)
        returned.append(time.perf_counter() - t0)
        jax.block_until_ready(drawn)
        ready.append(time.perf_counter() - t0)
      if args.profile_dir:  # the back-to-back calls only
        jax.profiler.start_trace(os.path.join(args.profile_dir, f"pack{pack}_{r}x{length}"))
      t0 = time.perf_counter()
      for _ in range(args.calls):
        state, drawn = eng.prefill_call(state, call)
      dispatched = time.perf_counter() - t0
      jax.block_until_ready(drawn)
      total = time.perf_counter() - t0
      if args.profile_dir:
        jax.profiler.stop_trace()
      print(json.dumps({"shape": f"{r}x{length}", "pack_prompts": bool(pack), "prompts_per_call":
                        eng.prompts_per_call(r, length), "attention_impl": cfg.attention_impl,
                        "returns_ms": round(1000 * float(np.median(returned)), 3),
                        "ready_ms": round(1000 * float(np.median(ready)), 3),
                        "back_to_back_dispatch_ms": round(1000 * dispatched / args.calls, 3),
                        "back_to_back_ms": round(1000 * total / args.calls, 3), **device_info()}), flush=True)
    del eng, state


if __name__ == "__main__":
  main()
