"""PPO throughput, stage by stage, with the real recipe's jitted pieces on random weights: rollout
(the generation engine: prefill and decode of every prompt's answer), scoring (the policy, the
frozen reference and the reward model over the rollout), one update (a minibatch's forward and
backward), and whole steps (rollout, scoring, `ppo.epochs` x `ppo.minibatches` updates).

  python -m llama_jax.bench ppo --config configs/ppo_tinyllama_1b.py [--config.batch_size=64 ...]

Every rollout row decodes all `max_new_tokens` (no EOS). Rollout tokens/s counts new tokens; scoring
and update tokens/s count sequence tokens (prompt_len + max_new_tokens per row). The update's MFU
counts 6N per sequence token for the blocks, the output head only on the response positions (where
the recipe applies it), and causal attention.
"""

from __future__ import annotations

import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import sharding
from llama_jax.align.heads import model_part, policy_params, reward_params
from llama_jax.align.ppo import Rollout, validate as validate_ppo
from llama_jax.align.recipe import frozen_copy
from llama_jax.bench.common import device_info, profiled
from llama_jax.config import ModelConfig
from llama_jax.train import loop, metrics


def _progress(stage: str, t0: float) -> None:
  """A stage's end on stderr: on a 1.1B model each stage's compilation takes a minute or more."""
  print(f"bench ppo: {stage} done at {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def _timed(fn, repeats: int):
  out = jax.block_until_ready(fn())  # compilation
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = jax.block_until_ready(fn())
  return out, (time.perf_counter() - t0) / repeats


def bench_ppo(config, warmup: int, steps: int, profile_dir: str = "") -> dict:
  """Each stage once untimed (compilation), then `steps` timed repeats; with `profile_dir`, a
  jax.profiler trace of the timed whole steps."""
  del warmup  # each stage is run once untimed (compilation) before its timed repeats
  if "ppo" not in config:
    raise ValueError("the config has no ppo block: use a PPO config (configs/ppo_tinyllama_1b.py)")
  config.init_from = config.init_from or "random"  # random weights stand for both models
  config.ppo.reward_model = config.ppo.reward_model or "random"
  model_cfg = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  rules = sharding.as_rules(config.mesh.rules)
  loop.validate(config, model_cfg, mesh)
  validate_ppo(config, model_cfg, mesh)
  p = config.ppo
  run = loop.make_training(config, model_cfg, mesh, params_fn=policy_params)
  b, length = config.batch_size * p.group_size, p.prompt_len + p.max_new_tokens
  rows = b // p.minibatches
  start = time.perf_counter()
  with sharding.activation_rules(mesh, rules):
    state = run.init(jax.random.key(0))
    rm_params = jax.jit(lambda rng: nn.unbox(reward_params(model_cfg, rng)))(jax.random.key(1))
    frozen = {"reference": frozen_copy(model_cfg, model_part(state.params)),
              "reward": frozen_copy(model_cfg, rm_params)}
    rollout = Rollout(config, model_cfg, model_cfg, mesh, rules, run, frozen)
    rollout.eos_ids = jnp.asarray([-1], jnp.int32)  # every row makes all its tokens
    rng = np.random.default_rng(0)
    prompts = {"prompt": rng.integers(3, model_cfg.vocab_size, (config.batch_size, p.prompt_len), dtype=np.int32),
               "prompt_mask": np.ones((config.batch_size, p.prompt_len), np.float32)}
    batch = jax.device_put(prompts, run.batch_sharding)
    step = jnp.zeros((), jnp.int32)
    generated, rollout_s = _timed(lambda: rollout.generate(state.params, batch["prompt"], batch["prompt_mask"],
                                                           step, greedy=False), steps)
    _progress("rollout", start)
    made = int(np.asarray(generated[3]).min())
    if made != p.max_new_tokens:
      raise RuntimeError(f"rows made {made} tokens, not {p.max_new_tokens}")
    (experience, _, _), score_s = _timed(lambda: rollout.experience(state.params, frozen, *generated,
                                                                    greedy=False), steps)
    _progress("scoring", start)
    order = jnp.arange(rows)
    state, _ = rollout.update(state, experience, order)  # compilation
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = rollout.update(state, experience, order)
    jax.block_until_ready(m)
    update_s = (time.perf_counter() - t0) / steps
    _progress("update", start)
    state, m = rollout.step(state, batch)  # compilation of what is left
    jax.block_until_ready(m)
    _progress("first whole step", start)
    with profiled(profile_dir):
      t0 = time.perf_counter()
      for _ in range(steps):
        state, m = rollout.step(state, batch)
      jax.block_until_ready(m)
      step_s = (time.perf_counter() - t0) / steps
  n = p.max_new_tokens
  head = 6.0 * model_cfg.dim * model_cfg.vocab_size
  update_flops = rows * (length * (metrics.flops_per_token(model_cfg, length) - head) + n * head)
  peak = config.peak_flops_per_device or metrics.peak_flops(jax.devices()[0], model_cfg.dtype)
  return {"rollouts": b, "prompt_len": p.prompt_len, "new_tokens": n, "minibatch": rows,
          "rollout_s": round(rollout_s, 4), "rollout_tokens_per_s": round(b * n / rollout_s, 1),
          "score_s": round(score_s, 4), "score_tokens_per_s": round(b * length / score_s, 1),
          "update_s": round(update_s, 4), "update_tokens_per_s": round(rows * length / update_s, 1),
          "update_mfu": round(update_flops / update_s / (peak * jax.device_count()), 4) if peak else None,
          "step_s": round(step_s, 4), "updates_per_step": p.epochs * p.minibatches, **device_info()}
