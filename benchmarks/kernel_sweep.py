"""The fused decode kernels by tile and launch settings, on one GPU: the matrix-vector kernel
(`llama_jax.kernels.matvec`) and the rotary + cache write + attention one
(`kernels.decode_attention.rotary_cache_attention`).

  python benchmarks/kernel_sweep.py [--rows 1,16] [--dim 2048 --hidden 5632 --heads 32 --kv_heads 4]

For each of a decode block's four products (TinyLlama-1.1B's shapes by default) and each setting
(block_n output rows and block_k inputs a program step, warps, pipeline stages, and for one row the
multiply-and-sum form, summed each step or at the end (`wide`), against Triton's dot on rows padded
to 16): `layers` copies of the weight (so
that they do not sit in L2) run one after another in one program, three times, under the profiler;
the kernel's own device time (mean, from the trace) and the bandwidth it reaches on the weight's
bytes. One JSON line per setting, then the best per product. `--decode CONFIG`: then the batch-1
decode with XLA's blocks, the fused ones as committed, and the fused ones with the best settings. Then the attention kernel by cache
positions a loop step reads (`--attention_blocks`) and warps, over a cache of `--lengths`
positions filled to the end, `layers` caches of its own. `--quantize int8|int4`: the products on
round-to-nearest weights (int8 per output channel, int4 in groups of 128), and the decode with them.
"""

from __future__ import annotations

import argparse
import collections
import glob
import itertools
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax import model as M  # noqa: E402
from llama_jax import projection  # noqa: E402
from decode_kernels_check import product_inputs  # noqa: E402  (a script beside this one)
from llama_jax.config import ModelConfig  # noqa: E402
from llama_jax.kernels import decode_attention, decode_block, matvec  # noqa: E402


def kernel_times(trace_dir: str) -> dict[str, list[int]]:
  from jax.profiler import ProfileData
  path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
  times = collections.defaultdict(list)
  for plane in ProfileData.from_file(path).planes:
    if not re.match(r"/device:GPU:0$", plane.name):
      continue
    for line in plane.lines:
      if any(s in line.name.lower() for s in ("xla ops", "module", "step")):
        continue
      for ev in line.events:
        times[re.sub(r"__\d+$", "", ev.name)].append(ev.duration_ns)
  return times


def profiled(settings: dict, *args) -> dict[str, list[int]]:
  """Each jitted function of `settings` run 3 times under the profiler: its kernels' times by name."""
  with tempfile.TemporaryDirectory() as trace:
    with jax.profiler.trace(trace):
      for fn in settings.values():
        for _ in range(3):
          jax.block_until_ready(fn(*args))
    return kernel_times(trace)


def attention(args, rows: int, length: int) -> None:
  n, kv, h = args.heads, args.kv_heads, args.dim // args.heads
  key = jax.random.key(length)
  qkv = jax.random.normal(key, (rows, n + 2 * kv, h), jnp.bfloat16)
  caches = [jax.random.normal(jax.random.fold_in(key, i), (rows, kv, length, h), jnp.bfloat16)
            for i in range(2 * args.layers)]
  positions = jnp.full((rows,), length - 1, jnp.int32)
  sin, cos = M.rotary_tables(positions[:, None], ModelConfig(dim=h, n_heads=1))
  settings = {}
  for block, warps in itertools.product(map(int, args.attention_blocks.split(",")), (4, 8)):
    tag = f"att_{block}_{warps}"
    settings[tag] = jax.jit(lambda qkv, caches, block=block, warps=warps, tag=tag: [
        decode_attention.rotary_cache_attention(
            qkv, sin[:, 0, 0], cos[:, 0, 0], positions, caches[2 * i], caches[2 * i + 1], n_heads=n,
            block_k=block, num_warps=warps, name=tag)[0] for i in range(args.layers)])
    jax.block_until_ready(settings[tag](qkv, caches))
  times = profiled(settings, qkv, caches)
  for tag in settings:
    ns = times.get(tag, [])
    if ns:
      print(json.dumps({"product": "attention", "rows": rows, "cache_length": length, "setting": tag,
                        "us": round(sum(ns) / len(ns) / 1e3, 2), "kernels": len(ns)}), flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", default="1,16")
  p.add_argument("--dim", type=int, default=2048)
  p.add_argument("--hidden", type=int, default=5632)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--layers", type=int, default=22)
  p.add_argument("--block_n", default="16,32")
  p.add_argument("--block_k", default="256,512,1024")
  p.add_argument("--warps", default="4,8")
  p.add_argument("--stages", default="2,4")
  p.add_argument("--attention_blocks", default="64,128,256")
  p.add_argument("--lengths", default="384,2048", help="attention's cache lengths ('' for none)")
  p.add_argument("--quantize", default="", help="int8 or int4: the products on quantized weights")
  p.add_argument("--decode", default="", help="a config: then its batch-1 decode (bench decode, 128 + 256 "
                 "tokens) with XLA's blocks, the fused ones as committed, and the fused ones with the "
                 "settings measured best for each input width")
  args = p.parse_args()
  measured = collections.defaultdict(dict)  # (rows, input width) -> setting -> product -> us
  shape = ModelConfig(dim=args.dim, n_heads=args.heads, n_kv_heads=args.kv_heads,
                      ffn_hidden_dim=args.hidden, n_layers=args.layers)
  ints = lambda s: [int(v) for v in s.split(",")]
  for rows in ints(args.rows):
    for product in decode_block.products(shape):
      name, outputs, inputs = product.weight, product.outputs, product.inputs
      x, ws, kw = product_inputs(product, rows, args.layers, jax.random.key(outputs + inputs), args.quantize)
      weight = matvec.Weight.of(ws[0])
      settings, settings_of = {}, {}
      forms = ((True, False), (True, True), (False, False)) if rows == 1 else ((False, False),)
      for bn, bk, warps, stages, (reduce, wide) in itertools.product(
          ints(args.block_n), ints(args.block_k), ints(args.warps), ints(args.stages), forms):
        chosen = matvec.Settings(bn, bk, warps, stages, reduce, wide)
        if not matvec.supported(rows, inputs, outputs, kw["gate_up"], chosen, weight) or (bn < 16 and not reduce):
          continue
        tag = f"mv_{bn}_{bk}_{warps}_{stages}_{int(reduce)}{int(wide)}"
        fn = jax.jit(lambda x, ws, chosen=chosen, tag=tag: [
            matvec.matvec(x, w, chosen=chosen, name=tag, **kw) for w in ws])
        try:
          jax.block_until_ready(fn(x, ws))
        except Exception as e:  # a setting Triton cannot compile (registers, shared memory)
          print(json.dumps({"product": name, "rows": rows, "setting": tag, "error": str(e)[:200]}), flush=True)
          continue
        settings[tag], settings_of[tag] = fn, chosen
      times = profiled(settings, x, ws)
      best = None
      for tag in settings:
        ns = times.get(tag)
        if not ns:
          continue
        us = sum(ns) / len(ns) / 1e3
        measured[(rows, inputs)].setdefault(settings_of[tag], {})[name] = us
        row = {"product": name, "rows": rows, "shape": [outputs, inputs], "quantize": args.quantize or "none",
               "setting": tag, "us": round(us, 2), "tb_per_s": round(projection.nbytes(ws[0]) / us / 1e6, 3),
               "kernels": len(ns)}
        print(json.dumps(row), flush=True)
        best = row if best is None or row["us"] < best["us"] else best
      print(json.dumps({"best": best}), flush=True)
    for length in ints(args.lengths) if args.lengths else ():
      attention(args, rows, length)
  if args.decode:
    decode(args.decode, measured, args.quantize)


def decode(config_path: str, measured: dict, quantize: str = "") -> None:
  """The batch-1 decode three ways; the fused blocks' settings replaced, for each input width the
  sweep measured at one row, by the one whose products (of that width) took the least time."""
  from llama_jax.bench.decode import bench_decode
  from llama_jax.train.cli import load_config
  config = load_config(config_path)
  best = {}
  for (rows, width), by_setting in measured.items():
    if rows == 1:
      products = max(len(v) for v in by_setting.values())
      full = {k: sum(v.values()) for k, v in by_setting.items() if len(v) == products}
      best[width] = min(full, key=full.get)
  committed = matvec.settings
  for label, kernels, chosen in (("xla", "xla", committed), ("fused, committed settings", "pallas", committed),
                                 ("fused, best measured", "pallas",
                                  lambda rows, d, weight=matvec.Weight(): best.get(d) if rows == 1 and d in best
                                  else committed(rows, d, weight))):
    jax.clear_caches()  # the engine's programs are cached by config: rebuild them with these settings
    matvec.settings = chosen
    config.model.decode_kernels = kernels
    result = bench_decode(config, 1, 128, 256, quantize=quantize)
    print(json.dumps({"decode": label, "settings": {d: s._asdict() for d, s in best.items()}
                      if "best" in label else None, **result}), flush=True)
  matvec.settings = committed


if __name__ == "__main__":
  main()
