"""Training throughput: the real train_step, sharding and optimiser on synthetic tokens.

  python -m llama_jax.bench train --config configs/tinyllama_1b.py [--config.key=value ...]
"""

from __future__ import annotations

import jax
import numpy as np

from llama_jax import sharding
from llama_jax.bench.common import device_info, time_steps
from llama_jax.config import ModelConfig
from llama_jax.train import metrics
from llama_jax.train.loop import make_training, validate


def synthetic_batch(vocab_size: int, batch_size: int, seq_len: int) -> dict:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
          "segment_ids": np.zeros((batch_size, seq_len), np.int32),
          "loss_mask": np.ones((batch_size, seq_len), np.float32)}


def bench_train(config, warmup: int, steps: int, profile_dir: str = "") -> dict:
  """Median-free: `steps` timed steps after `warmup` untimed ones (compilation, autotuning). With
  `profile_dir`, a jax.profiler trace of the timed steps only."""
  model_cfg = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  validate(config, model_cfg, mesh)
  run = make_training(config, model_cfg, mesh)
  b, t = config.batch_size, config.seq_len
  with sharding.activation_rules(mesh, config.mesh.rules):
    batch = jax.device_put(synthetic_batch(model_cfg.vocab_size, b, t), run.batch_sharding)
    state = run.init(jax.random.key(0))
    state, compile_s, step_s, loss = time_steps(run.step, state, batch, warmup, steps, "train/loss",
                                                profile_dir)
  tokens_per_s = b * t / step_s
  peak = config.peak_flops_per_device or metrics.peak_flops(jax.devices()[0], model_cfg.dtype)
  frozen = run.adapters is not None  # LoRA: the base gets no weight gradients
  flops = metrics.flops_per_token(model_cfg, t, frozen) * tokens_per_s
  return {"tokens_per_s": round(tokens_per_s, 1), "step_s": round(step_s, 5),
          "mfu": round(flops / (peak * jax.device_count()), 4) if peak else None,
          "model_tflops_per_s_per_device": round(flops / jax.device_count() / 1e12, 1),
          "loss": round(loss, 4), "warmup_s": round(compile_s, 1), "batch_size": b, "seq_len": t,
          **device_info()}
