"""DPO throughput: the real DPO step (the policy's forward and backward, the frozen reference's
forward, both sequences of every pair in one batch) on synthetic pairs and random weights.

  python -m llama_jax.bench dpo --config configs/dpo_tinyllama_1b.py [--config.batch_size=8 ...]

tokens/s counts both sequences of each pair (2 x batch_size x seq_len per step). MFU counts the
policy's 6N and the reference's 2N FLOPs per token, with causal attention's (`align.dpo.DPO.throughput`),
against the device's dense peak.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from llama_jax import sharding
from llama_jax.align.dpo import DPO
from llama_jax.align.recipe import frozen_copy
from llama_jax.bench.common import device_info, time_steps
from llama_jax.config import ModelConfig
from llama_jax.model import init_params
from llama_jax.train import metrics
from llama_jax.train.loop import validate


def synthetic_pairs(vocab_size: int, pairs: int, length: int, prompt: int) -> dict:
  """Random chosen and rejected sequences of `length` tokens sharing their first `prompt` tokens;
  the rest is the response."""
  rng = np.random.default_rng(0)
  chosen = rng.integers(3, vocab_size, (pairs, length), dtype=np.int32)
  rejected = chosen.copy()
  rejected[:, prompt:] = rng.integers(3, vocab_size, (pairs, length - prompt), dtype=np.int32)
  mask = np.broadcast_to((np.arange(length) >= prompt).astype(np.float32), (pairs, length)).copy()
  return {"chosen": chosen, "chosen_mask": mask, "rejected": rejected, "rejected_mask": mask.copy()}


class RandomReference(DPO):
  """DPO whose reference is a frozen copy of a random model (no init_from to read)."""

  def frozen(self, config, model_cfg: ModelConfig, mesh, run):
    shardings = run.state_sharding.params
    params = jax.jit(lambda rng: nn.unbox(init_params(model_cfg, rng)), out_shardings=shardings)(jax.random.key(1))
    return frozen_copy(model_cfg, params, shardings), shardings


def bench_dpo(config, warmup: int, steps: int, profile_dir: str = "") -> dict:
  """`steps` timed steps after `warmup` untimed ones; with `profile_dir`, a jax.profiler trace of
  the timed steps only."""
  if "dpo" not in config:
    raise ValueError("the config has no dpo block: use a DPO config (configs/dpo_tinyllama_1b.py)")
  model_cfg = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  validate(config, model_cfg, mesh)
  recipe = RandomReference()
  run = recipe.make_training(config, model_cfg, mesh)
  b, t = config.batch_size, config.seq_len
  with sharding.activation_rules(mesh, config.mesh.rules):
    batch = jax.device_put(synthetic_pairs(model_cfg.vocab_size, b, t + 1, (t + 1) // 2), run.batch_sharding)
    state = run.init(jax.random.key(0))
    state, compile_s, step_s, loss = time_steps(run.step, state, batch, warmup, steps, "dpo/loss", profile_dir)
  tokens, flops = recipe.throughput(config, model_cfg)
  peak = config.peak_flops_per_device or metrics.peak_flops(jax.devices()[0], model_cfg.dtype)
  return {"tokens_per_s": round(tokens / step_s, 1), "pairs_per_s": round(b / step_s, 2),
          "step_s": round(step_s, 5), "mfu": round(flops / step_s / (peak * jax.device_count()), 4) if peak else None,
          "model_tflops_per_s_per_device": round(flops / step_s / jax.device_count() / 1e12, 1),
          "loss": round(loss, 4), "warmup_s": round(compile_s, 1), "pairs": b, "seq_len": t, **device_info()}
