"""Benchmarks. The last line of each is one JSON object.

  python -m llama_jax.bench train --config configs/tinyllama_1b.py [--config.key=value ...]
      the real train_step, sharding and optimiser on synthetic tokens
  python -m llama_jax.bench decode --config configs/tinyllama_1b.py --batch_size B --prompt_len P --new_tokens N
      the real generation engine on random weights
  python -m llama_jax.bench data [...]
      the data pipeline's tokens/s on this machine (llama_jax.bench_data)
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def _device_info():
  import jax
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return {"device": f"{jax.device_count()}x {device.device_kind}",
          "peak_mem_gb": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)}


def bench_train(config, warmup: int, steps: int) -> dict:
  import jax

  from llama_jax import metrics, sharding
  from llama_jax.config import ModelConfig
  from llama_jax.trainer import make_training, validate

  model_cfg = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  validate(config, model_cfg, mesh)
  run = make_training(config, model_cfg, mesh)
  rng = np.random.default_rng(0)
  b, t = config.batch_size, config.seq_len
  tokens = rng.integers(0, model_cfg.vocab_size, (b, t + 1), dtype=np.int32)
  host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                "segment_ids": np.zeros((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32)}
  with sharding.activation_rules(mesh, config.mesh.rules):
    batch = jax.device_put(host_batch, run.batch_sharding)
    state = run.init(jax.random.key(0))
    t0 = time.perf_counter()
    for _ in range(warmup):
      state, m = run.step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = run.step(state, batch)
    loss = float(m["train/loss"])  # the host sync that ends the timed region
    step_s = (time.perf_counter() - t0) / steps
  tokens_per_s = b * t / step_s
  peak = config.peak_flops_per_device or metrics.peak_flops(jax.devices()[0], model_cfg.dtype)
  flops = metrics.flops_per_token(model_cfg, t) * tokens_per_s
  return {"tokens_per_s": round(tokens_per_s, 1), "step_s": round(step_s, 5),
          "mfu": round(flops / (peak * jax.device_count()), 4) if peak else None,
          "model_tflops_per_s_per_device": round(flops / jax.device_count() / 1e12, 1),
          "loss": round(loss, 4), "warmup_s": round(compile_s, 1), "batch_size": b, "seq_len": t,
          **_device_info()}


def bench_decode(config, batch_size: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
  from llama_jax import sampling
  return {**sampling.benchmark(config, batch_size, prompt_len, new_tokens, repeats), **_device_info()}


def main():
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", "configs/tinyllama_1b.py", "Config file.", lock_config=True)
  flags.DEFINE_integer("warmup", 3, "Untimed steps (compilation).")
  flags.DEFINE_integer("steps", 10, "Timed steps.")
  flags.DEFINE_integer("batch_size", 1, "decode: prompts per batch.")
  flags.DEFINE_integer("prompt_len", 128, "decode: prompt tokens.")
  flags.DEFINE_integer("new_tokens", 256, "decode: tokens generated per prompt.")
  flags.DEFINE_integer("repeats", 5, "decode: timed repetitions (median).")
  flags.DEFINE_string("profile_dir", "", "Write a jax.profiler trace of the run here "
                      "(summarise it with benchmarks/profile_summary.py).")
  FLAGS = flags.FLAGS

  def run(argv):
    if len(argv) != 2 or argv[1] not in ("train", "decode"):
      raise app.UsageError("usage: python -m llama_jax.bench train|decode|data [flags]")
    import contextlib

    import jax
    trace = jax.profiler.trace(FLAGS.profile_dir) if FLAGS.profile_dir else contextlib.nullcontext()
    with trace:
      if argv[1] == "train":
        result = bench_train(FLAGS.config, FLAGS.warmup, FLAGS.steps)
      else:
        result = bench_decode(FLAGS.config, FLAGS.batch_size, FLAGS.prompt_len, FLAGS.new_tokens,
                              FLAGS.repeats)
    print(json.dumps(result))

  app.run(run)


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "data":
    from llama_jax import bench_data
    bench_data.main(sys.argv[2:])
  else:
    main()
