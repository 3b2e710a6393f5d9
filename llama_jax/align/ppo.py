"""RLHF with PPO (Ziegler et al. 2019; Stiennon et al. 2020; InstructGPT, Ouyang et al. 2022): the
recipe "ppo", and GRPO (Shao et al. 2024) as its critic-free variant (`ppo.advantage = "grpo"`).

One loop step is one rollout batch and several optimisation epochs over it:
  1. rollout: `batch_size` prompts (times `ppo.group_size` samples) drawn from the current policy
     by the project's generation engine (`generate.engine`: one prefill into a KV cache, then the
     jitted decode loop), on the run's mesh with its `mesh.rules`, from the trained parameters
     themselves (no second model for sampling). Every row's key is folded from (seed, step, row),
     and the engine folds in each token's index: a run resumed from a checkpoint draws exactly what
     the uninterrupted run draws.
  2. scoring, one jitted pass: the policy's log-probs and values on the response tokens, the
     frozen reference's log-probs, and the reward model's score at the last response token. All
     log-probs, here and in the updates, are at `ppo.temperature` (softmax(logits / T), TRL's
     convention): the policy trained is the distribution the rollouts are drawn from. `ppo.top_k`
     and `ppo.top_p` cut the sampling distribution, not the log-probs (left at 0 and 1 as TRL's).
  3. advantages. "gae": the per-token reward -kl_coef (log π - log π_ref), the score added at the
     last token (InstructGPT's KL-shaped reward), GAE(γ, λ) against the value head, whitened.
     "grpo": each sample's score against its group's mean (over its standard deviation), for every
     token of its response; the KL to the reference (k3) goes into the loss instead.
  4. `ppo.epochs` passes over the rollout in `ppo.minibatches` shuffled minibatches, each one
     `train.step.gradient_step` of the clipped policy loss plus vf_coef times the clipped value loss,
     averaged as `ppo.loss_type` says: "token" (every response token alike, TRL's PPO), "sequence"
     (each answer's tokens, then the answers: GRPO's eq. 3); "auto" is "sequence" for grpo,
     "token" for gae.

The policy and its value head share the backbone: the trained tree is the model's plus
`value_head`, so a PPO workdir loads as a plain model (`llama_jax.load`, `generate.py`). The
reference (the `init_from` model, an SFT checkpoint) and the reward model (`ppo.reward_model`, a
reward run's workdir) are frozen compute-dtype copies, outside the optimiser state.

Metrics: ppo/reward_mean (the reward model's mean score of the rollout's answers), ppo/kl (mean over
answers of Σ_t log π - log π_ref), ppo/response_length, and over the updates' response tokens
ppo/policy_loss, ppo/value_loss (gae), ppo/entropy, ppo/clipfrac; eval/reward_mean and eval/kl of
greedy answers to the held-out prompts.
"""

from __future__ import annotations

import dataclasses
import filecmp
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp

from llama_jax import sharding
from llama_jax.align import data as align_data
from llama_jax.align import recipe
from llama_jax.align.heads import model_part, policy_params, response_outputs, rewards
from llama_jax.align.losses import (LOSS_TYPES, clipped_policy_loss, gae, group_advantages, k3_kl,
                                    kl_shaped_rewards, masked_whiten, token_weights, value_loss)
from llama_jax.align.reward import load_reward_model
from llama_jax.config import ModelConfig
from llama_jax.data import resolve_sources
from llama_jax.generate import engine
from llama_jax.generate.sampling import SamplingParams
from llama_jax.lora.training import settings as lora_settings
from llama_jax.sharding import ConfigError
from llama_jax.tokenizer import chat
from llama_jax.train import loop
from llama_jax.train.step import gradient_step

ADVANTAGES = ("gae", "grpo")

log = logging.getLogger("llama_jax")


def validate(config, model_cfg: ModelConfig, mesh) -> None:
  p = config.ppo
  recipe.require(config, "init_from", "PPO's policy and reference start from an SFT model")
  if lora_settings(config) is not None:
    raise ConfigError("config.lora: PPO does not train LoRA adapters (its rollouts and value head read "
                      "the whole policy); set lora.rank=0, or use LoRA with the sft, reward or dpo recipes")
  recipe.require(config, "ppo.reward_model", "PPO needs a reward model (a reward run's workdir)")
  if p.advantage not in ADVANTAGES:
    raise ConfigError(f"ppo.advantage must be one of {ADVANTAGES}, got {p.advantage!r}")
  if loss_type(p) not in LOSS_TYPES:
    raise ConfigError(f"ppo.loss_type must be 'auto' or one of {LOSS_TYPES}, got {p.loss_type!r}")
  if p.advantage == "grpo" and p.group_size < 2:
    raise ConfigError(f"ppo.advantage 'grpo' compares samples of a prompt: ppo.group_size must be >= 2, "
                      f"got {p.group_size}")
  if not float(p.temperature) > 0:
    raise ConfigError(f"ppo.temperature must be > 0 (rollouts are sampled; the log-probs are taken at it), "
                      f"got {p.temperature}")
  for name in ("prompt_len", "max_new_tokens", "epochs", "minibatches", "group_size"):
    if int(p[name]) < 1:
      raise ConfigError(f"ppo.{name} must be >= 1, got {p[name]}")
  if p.prompt_len + p.max_new_tokens > model_cfg.max_seq_len:
    raise ConfigError(f"ppo.prompt_len + ppo.max_new_tokens ({p.prompt_len} + {p.max_new_tokens}) exceeds "
                      f"model.max_seq_len ({model_cfg.max_seq_len})")
  rollouts = config.batch_size * p.group_size
  if rollouts % p.minibatches:
    raise ConfigError(f"ppo.minibatches ({p.minibatches}) must divide the rollout batch "
                      f"(batch_size x ppo.group_size = {rollouts})")
  rows = rollouts // p.minibatches
  accum = int(config.optimizer.grad_accum_steps)
  if rows % accum:
    raise ConfigError(f"optimizer.grad_accum_steps ({accum}) must divide a minibatch ({rows} rollouts)")
  try:
    sharding.check_divisible(mesh, rows // accum, model_cfg.n_heads, model_cfg.n_kv_heads, config.mesh.rules)
  except ConfigError as e:
    raise ConfigError(f"PPO minibatches (rollouts / ppo.minibatches / grad_accum_steps): {e}") from None


def loss_type(p) -> str:
  """ppo.loss_type, "auto" resolved: each paper's own averaging, per answer for GRPO (its eq. 3),
  per token for PPO (TRL's masked mean)."""
  name = p.get("loss_type", "auto")  # configs written before the field
  if name == "auto":
    return "sequence" if p.advantage == "grpo" else "token"
  return name


def assemble(prompt, prompt_lengths, response, response_lengths, pad_id: int):
  """Prompt (B, P) right-padded and response (B, N) -> the sequences (B, P + N) with each response
  right after its prompt, and the positions (B, N) whose next tokens are the response's."""
  p, n = prompt.shape[1], response.shape[1]
  t = jnp.arange(p + n)[None, :]
  start = prompt_lengths[:, None]
  from_prompt = jnp.take_along_axis(prompt, jnp.minimum(t, p - 1), axis=1)
  from_response = jnp.take_along_axis(response, jnp.clip(t - start, 0, n - 1), axis=1)
  tokens = jnp.where(t < start, from_prompt,
                     jnp.where(t < start + response_lengths[:, None], from_response, pad_id))
  return tokens, start - 1 + jnp.arange(n)[None, :]


class PPO(loop.LanguageModel):
  metric = "ppo/reward_mean"

  def count_steps(self, config, tokenizer) -> int:
    return align_data.count_batches(config.data, tokenizer, "prompts", length=config.ppo.prompt_len,
                                    global_batch_size=config.batch_size, seed=config.seed,
                                    process_index=jax.process_index(), process_count=jax.process_count())

  def make_iterator(self, config, tokenizer, split: str):
    return align_data.make_iterator(
        config.data, tokenizer, "prompts", length=config.ppo.prompt_len,
        global_batch_size=config.batch_size, seed=config.seed, split=split,
        process_index=jax.process_index(), process_count=jax.process_count())

  def from_pretrained(self, loaded, config, model_cfg: ModelConfig, run):
    dtype = model_cfg.param_dtype
    params = dict(loaded.params, value_head={"kernel": jnp.zeros((model_cfg.dim,), dtype),
                                              "bias": jnp.zeros((), dtype)})
    return loop.state_from_pretrained(loaded, run, params=params)

  def throughput(self, config, model_cfg: ModelConfig) -> tuple[int, float]:
    """Sequence tokens of a rollout; no MFU (generation and updates differ too much to sum:
    `python -m llama_jax.bench ppo` times them apart)."""
    p = config.ppo
    return config.batch_size * p.group_size * (p.prompt_len + p.max_new_tokens), 0.0

  def make_training(self, config, model_cfg: ModelConfig, mesh) -> loop.Training:
    validate(config, model_cfg, mesh)
    p = config.ppo
    rules = sharding.as_rules(config.mesh.rules)
    updates = int(p.epochs) * int(p.minibatches)
    # The optimiser's schedule counts updates: ppo.epochs x ppo.minibatches per step.
    schedule = config.copy_and_resolve_references()
    schedule.num_steps = config.num_steps * updates
    run = loop.make_training(schedule, model_cfg, mesh, params_fn=policy_params)

    reference = recipe.load_frozen_model(config.init_from, model_cfg, mesh, rules, "init_from")
    ref_sharding = sharding.param_shardings(model_cfg, mesh, rules)
    rm = load_reward_model(p.reward_model, mesh=mesh, rules=rules)
    if rm.config.vocab_size != model_cfg.vocab_size or (
        rm.tokenizer and reference.tokenizer and not filecmp.cmp(rm.tokenizer.path, reference.tokenizer.path,
                                                                shallow=False)):
      raise ConfigError(f"ppo.reward_model {p.reward_model}: its tokenizer is not the policy's (init_from "
                        f"{config.init_from}): the same ids would not be the same text")
    _warn_of_other_templates(config, p.reward_model, rm.template, reference.tokenizer)
    rm_cfg = rm.config.replace(dtype=model_cfg.dtype, attention_impl=model_cfg.attention_impl,
                               scan_layers=model_cfg.scan_layers, remat_policy="none", loss_chunk_len=0)
    if rm_cfg.max_seq_len < p.prompt_len + p.max_new_tokens:
      raise ConfigError(f"ppo.reward_model {p.reward_model}: its max_seq_len ({rm_cfg.max_seq_len}) is "
                        f"shorter than ppo.prompt_len + ppo.max_new_tokens")
    frozen = {"reference": recipe.frozen_copy(model_cfg, model_part(reference.params), ref_sharding),
              "reward": recipe.frozen_copy(rm_cfg, rm.params)}
    tokenizer = reference.tokenizer
    del reference, rm
    rollout = Rollout(config, model_cfg, rm_cfg, mesh, rules, run, frozen, tokenizer)
    return dataclasses.replace(run, step=rollout.step, eval=rollout.evaluate)

  def evaluate(self, config, run: loop.Training, state, tokenizer) -> dict:
    return recipe.eval_means(config, run, lambda batch: run.eval(state, batch),
                             self.make_iterator(config, tokenizer, "eval"))


def _warn_of_other_templates(config, reward_model: str, trained: str | None, tokenizer) -> None:
  """A warning where the prompt sources render in another chat template than the reward model's
  pairs were: it then scores answers laid out as it never saw. Not an error: scoring across
  templates can be the experiment. Unknown (None: a model saved without its run's record, or pairs
  of several templates): nothing to compare."""
  if trained is None:
    return
  rendering = chat.template_for(tokenizer, trained)
  others = sorted(name for name, s in _prompt_sources(config)
                  if chat.template_for(tokenizer, s["template"]) != rendering)
  if others:
    log.warning("ppo.reward_model %s was trained on pairs in the chat template %r, but the prompt "
                "sources %s render in another: it scores answers laid out as it never saw",
                reward_model, trained, ", ".join(others))


def _prompt_sources(config):
  """(name, source) of the training prompt sources that are drawn from (weight > 0)."""
  return [(s["name"], s) for s in resolve_sources(config.data, "train") if float(s.get("weight", 1.0)) > 0]


def stop_ids(config, tokenizer) -> list[int]:
  """The ids that end a rollout's answer: the tokenizer's EOS ids and the stop token of every prompt
  source's chat template (ChatML's <|im_end|> is no EOS in some tokenizers), as SFT's answers end
  and as `generate.py --chat` stops."""
  ids = list(tokenizer.eos_ids)
  for s in resolve_sources(config.data, "train"):
    ids += chat.template_for(tokenizer, s["template"]).stop_ids(tokenizer)
  return list(dict.fromkeys(ids))


class Rollout:
  """The jitted pieces of a PPO step and the Python that sequences them."""

  def __init__(self, config, model_cfg: ModelConfig, rm_cfg: ModelConfig, mesh, rules, run: loop.Training,
               frozen: Any, tokenizer=None):
    self.p, self.cfg, self.rm_cfg, self.mesh, self.rules = config.ppo, model_cfg, rm_cfg, mesh, rules
    self.run, self.frozen, self.seed = run, frozen, int(config.seed)
    self.accum = int(config.optimizer.grad_accum_steps)
    self.updates = int(self.p.epochs) * int(self.p.minibatches)
    # Every log-prob (the rollout's, the reference's, the updates') is taken at the sampling
    # temperature, as TRL's PPO divides its logits by it: the policy is softmax(logits / T), so the
    # first update's ratio is 1 on the rollout it drew and the KL compares like with like.
    self.temperature = float(self.p.temperature)
    self.loss_type = loss_type(self.p)
    # The init model's tokenizer is the run's (the workdir inherits it); LLaMA's ids without one.
    self.eos_ids = jnp.asarray(stop_ids(config, tokenizer) if tokenizer else [2], jnp.int32)
    self.pad_id = int(tokenizer.pad_id) if tokenizer else 0
    self.experience = jax.jit(self._experience, static_argnames=("greedy",))
    self.update = jax.jit(self._update, out_shardings=(run.state_sharding, None), donate_argnums=0)

  # --- 1. rollout
  def generate(self, params, prompt, prompt_mask, step, greedy: bool):
    """The engine over the prompts (each repeated group_size times unless greedy): (prompt rows,
    prompt lengths, response tokens (B', N), response lengths, valid rows)."""
    g = 1 if greedy else int(self.p.group_size)
    n = int(self.p.max_new_tokens)
    prompt, prompt_mask = _repeat(prompt, g), _repeat(prompt_mask, g)
    lengths, valid = _lengths(prompt_mask)
    b = prompt.shape[0]
    temperature = 0.0 if greedy else float(self.p.temperature)
    sampling = jax.tree.map(jnp.asarray, SamplingParams.make(b, temperature, int(self.p.top_k),
                                                             float(self.p.top_p)))
    keys = _row_keys(self.seed, step, b)
    weights = engine.prepare_params(self.cfg, model_part(params), self.mesh, self.rules)
    state = engine.prefill(self.cfg, weights, prompt, lengths, jnp.where(valid, n, 0), keys, sampling,
                           self.eos_ids, cache_len=prompt.shape[1] + n, budget=n, mesh=self.mesh,
                           rules=self.rules)
    state = engine.decode(self.cfg, weights, state, jnp.asarray(n, jnp.int32), mesh=self.mesh,
                          rules=self.rules)
    return prompt, lengths, state.tokens, state.lengths, valid

  # --- 2. and 3. scoring and advantages
  def _experience(self, params, frozen, prompt, prompt_lengths, response, response_lengths, valid, *,
                  greedy: bool):
    p = self.p
    tokens, index = assemble(prompt, prompt_lengths, response, response_lengths, self.pad_id)
    n = response.shape[1]
    mask = ((jnp.arange(n)[None, :] < response_lengths[:, None]) & valid[:, None]).astype(jnp.float32)
    logps, _, values = response_outputs(self.cfg, params, tokens, index, response, self.temperature)
    ref_logps, _, _ = response_outputs(self.cfg, frozen["reference"], tokens, index, response, self.temperature)
    last = prompt_lengths + jnp.maximum(response_lengths, 1) - 1
    scores = rewards(self.rm_cfg, frozen["reward"], tokens, last)
    shaped, kl = kl_shaped_rewards(logps, ref_logps, scores, mask, float(p.kl_coef))
    rows = valid.astype(jnp.float32)
    sums = {"reward_mean": jnp.sum(scores * rows), "kl": jnp.sum(kl), "response_length": jnp.sum(mask)}
    if greedy:
      return jnp.sum(rows), sums
    if p.advantage == "gae":
      advantages, returns = gae(shaped, values, mask, float(p.gamma), float(p.lam))
      if p.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    else:
      advantages = group_advantages(scores, int(p.group_size), bool(p.scale_rewards))[:, None] * mask
      returns = values = jnp.zeros_like(advantages)
    experience = {"tokens": tokens, "index": index, "targets": response, "mask": mask, "old_logps": logps,
                  "old_values": values, "ref_logps": ref_logps, "advantages": advantages, "returns": returns}
    return experience, jnp.sum(rows), sums

  # --- 4. updates
  def _update(self, state, experience, rows):
    p = self.p
    minibatch = jax.tree.map(lambda x: x[rows], experience)

    def objective(params, mb):
      logps, entropy, values = response_outputs(self.cfg, params, mb["tokens"], mb["index"], mb["targets"],
                                                self.temperature)
      m, count = token_weights(mb["mask"], self.loss_type)
      pg, clipped = clipped_policy_loss(logps, mb["old_logps"], mb["advantages"], float(p.clip))
      sums = {"ppo/policy_loss": pg, "ppo/entropy": entropy, "ppo/clipfrac": clipped}
      if p.advantage == "gae":
        sums["ppo/value_loss"] = value_loss(values, mb["old_values"], mb["returns"], float(p.value_clip))
        total = pg + float(p.vf_coef) * sums["ppo/value_loss"]
      else:
        sums["ppo/k3_kl"] = k3_kl(logps, mb["ref_logps"])
        total = pg + float(p.kl_coef) * sums["ppo/k3_kl"]
      sums = {k: jnp.sum(v * m) for k, v in sums.items()}
      return jnp.sum(total * m), count, sums

    state, metrics, _ = gradient_step(state, minibatch, objective, tx=self.run.tx, grad_accum_steps=self.accum)
    return state, metrics

  def step(self, state, batch):
    """One rollout batch and `epochs` x `minibatches` updates; state.step counts rollouts."""
    step = jnp.copy(state.step)  # the updates donate the state, its step with it
    prompt, lengths, response, response_lengths, valid = self.generate(
        state.params, batch["prompt"], batch["prompt_mask"], step, greedy=False)
    experience, count, sums = self.experience(state.params, self.frozen, prompt, lengths, response,
                                              response_lengths, valid, greedy=False)
    metrics = {"ppo/" + k: v / jnp.maximum(count, 1.0) for k, v in sums.items()}
    b = prompt.shape[0]
    size = b // int(self.p.minibatches)
    totals = None
    for epoch in range(int(self.p.epochs)):
      order = _permutation(self.seed, step, epoch, b)
      for i in range(int(self.p.minibatches)):
        state, m = self.update(state, experience, order[i * size:(i + 1) * size])
        totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
    metrics.update({k: v / self.updates for k, v in totals.items()})
    metrics["train/lr"] = self.run.lr_schedule((step + 1) * self.updates - 1)
    state = state.replace(step=jax.device_put(step + 1, self.run.state_sharding.step))
    return state, metrics

  def evaluate(self, state, batch):
    """(answers, {eval/reward_mean, eval/kl} sums) of greedy answers to a batch of prompts."""
    params = state.params
    prompt, lengths, response, response_lengths, valid = self.generate(
        params, batch["prompt"], batch["prompt_mask"], jnp.zeros((), jnp.int32), greedy=True)
    count, sums = self.experience(params, self.frozen, prompt, lengths, response, response_lengths, valid,
                                  greedy=True)
    return count, {"eval/reward_mean": sums["reward_mean"], "eval/kl": sums["kl"]}


@functools.partial(jax.jit, static_argnums=1)
def _repeat(x, times: int):
  return jnp.repeat(x, times, axis=0) if times > 1 else x


@jax.jit
def _lengths(prompt_mask):
  """(prompt lengths, valid rows): a padding row (no prompt) is given length 1 and no tokens."""
  n = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)
  return jnp.maximum(n, 1), n > 0


@functools.partial(jax.jit, static_argnums=(0, 2))
def _row_keys(seed: int, step, rows: int):
  base = jax.random.fold_in(jax.random.key(seed), step)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(rows))


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _permutation(seed: int, step, epoch: int, rows: int):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed + 1), step), epoch)
  return jax.random.permutation(key, rows)

