"""What the alignment recipes share: the pairs recipe (reward model, DPO) and the frozen models.

A recipe is what `train.loop.train_and_evaluate` trains (`train.loop.LanguageModel` states its
methods). A pairs recipe is an objective over a batch of preference pairs,
`objective(params, batch, frozen) -> (loss sum, pair count, {metric: sum})`: the step is
`train.step.gradient_step` of it (micro-batches, the non-finite guard, one jitted update with the
state donated), the evaluation is the same objective on the held-out pairs (its metrics under
`eval/`). Frozen models (DPO's reference; PPO's reference and reward model) are arguments of the
jitted functions, placed like the trained parameters, cast to the compute dtype (what every
forward pass casts them to anyway) and never in the optimiser state. With `config.lora` the step
trains adapters (`Training.view`) and DPO's reference is the run's own frozen base (`state.frozen`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from llama_jax import projection
from llama_jax.align import data as align_data
from llama_jax.config import ModelConfig
from llama_jax.model import MODEL_KEYS, init_params
from llama_jax.sharding import ConfigError
from llama_jax.train import loop
from llama_jax.train.step import gradient_step


def frozen_copy(cfg: ModelConfig, params: Any, shardings: Any = None) -> Any:
  """A copy of `params` placed by `shardings` (default: where they lie), the model's matrices in
  the compute dtype (heads and norms as they are): a frozen model never shares buffers with a
  trained one, whose state the step donates."""
  if shardings is None:
    shardings = jax.tree.map(lambda x: x.sharding, params)

  def cast(path, x):
    top = getattr(path[0], "key", None)
    if projection.is_quantized(x):  # integers and scales as they are: each matmul dequantizes
      return jax.tree.map(jnp.copy, x)
    return x.astype(cfg.dtype) if top in MODEL_KEYS and x.ndim >= 2 else x.copy()
  return jax.jit(lambda p: jax.tree_util.tree_map_with_path(cast, p, is_leaf=projection.is_quantized),
                 out_shardings=shardings)(params)


def require(config, field: str, why: str) -> str:
  value = config
  for part in field.split("."):
    value = value[part]
  if not value:
    raise ConfigError(f"config.{field} is empty: {why}")
  return value


class PairsRecipe(loop.LanguageModel):
  """Reward model and DPO: batches of preference pairs, an objective, evaluation on held-out pairs."""
  params_fn = staticmethod(init_params)  # boxed parameters of a random start

  def count_steps(self, config, tokenizer) -> int:
    return align_data.count_batches(config.data, tokenizer, "pairs", length=config.seq_len + 1,
                                    global_batch_size=config.batch_size, seed=config.seed,
                                    process_index=jax.process_index(), process_count=jax.process_count())

  def make_iterator(self, config, tokenizer, split: str):
    return align_data.make_iterator(
        config.data, tokenizer, "pairs", length=config.seq_len + 1, global_batch_size=config.batch_size,
        seed=config.seed, split=split, process_index=jax.process_index(),
        process_count=jax.process_count())

  # --- what a pairs recipe defines
  def frozen(self, config, model_cfg: ModelConfig, mesh, run: loop.Training) -> tuple[Any, Any]:
    """(frozen models, their shardings) the objective reads; none by default. (None, None): the
    run's own frozen base, `state.frozen` (a LoRA run's base model: DPO's reference)."""
    return {}, {}

  def objective(self, config, model_cfg: ModelConfig, params, batch: dict, frozen):
    raise NotImplementedError

  def make_training(self, config, model_cfg: ModelConfig, mesh) -> loop.Training:
    run = loop.make_training(config, model_cfg, mesh, params_fn=type(self).params_fn)
    frozen, frozen_sharding = self.frozen(config, model_cfg, mesh, run)
    accum = int(config.optimizer.grad_accum_steps)

    def step(state, batch, frozen):
      frozen = state.frozen if frozen is None else frozen
      objective = lambda params, micro: self.objective(config, model_cfg, params, micro, frozen)  # noqa: E731
      state, metrics, _ = gradient_step(state, batch, objective, tx=run.tx, grad_accum_steps=accum,
                                        lr_schedule=run.lr_schedule, view=run.view)
      return state, metrics

    def evaluate(state, batch, frozen):
      return self.objective(config, model_cfg, run.model_params(state), batch,
                            state.frozen if frozen is None else frozen)

    step = jax.jit(step, in_shardings=(run.state_sharding, run.batch_sharding, frozen_sharding),
                   out_shardings=(run.state_sharding, None), donate_argnums=0)
    evaluate = jax.jit(evaluate, in_shardings=(run.state_sharding, run.batch_sharding, frozen_sharding))
    return dataclasses.replace(run, step=lambda state, batch: step(state, batch, frozen),
                               eval=lambda state, batch: evaluate(state, batch, frozen))

  def evaluate(self, config, run: loop.Training, state, tokenizer) -> dict:
    """The objective's metrics over the held-out pairs, as eval/..."""
    means = eval_means(config, run, lambda batch: run.eval(state, batch)[1:],
                       self.make_iterator(config, tokenizer, "eval"))
    return {"eval/" + k.split("/", 1)[1]: v for k, v in means.items()}


def eval_means(config, run: loop.Training, fn, it) -> dict:
  """Means of the sums `fn(global batch) -> (count, {name: sum})` over `data.eval_batches` batches
  of the held-out iterator `it`."""
  total, sums = 0.0, {}
  for _ in range(int(config.data.eval_batches)):
    local = loop.next_batch(it, agree=jax.process_count() > 1)  # processes whose pairs end apart stop together
    if local is None:
      break
    batch = {k: jax.make_array_from_process_local_data(run.batch_sharding, v) for k, v in local.items()}
    count, batch_sums = jax.device_get(fn(batch))
    total += float(count)
    for k, v in batch_sums.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {k: v / total for k, v in sums.items()} if total else {}


def pair_rows(batch: dict) -> tuple[Any, Any, Any]:
  """(tokens, response mask, valid) of a pairs batch, chosen and rejected interleaved row by row:
  (2B, T+1), (2B, T+1), (B,). Interleaving (not concatenating) keeps each device's pairs on it."""
  tokens = jnp.stack([batch["chosen"], batch["rejected"]], axis=1)
  mask = jnp.stack([batch["chosen_mask"], batch["rejected_mask"]], axis=1)
  b, _, t = tokens.shape
  valid = (jnp.sum(batch["chosen_mask"], axis=1) > 0).astype(jnp.float32)  # padding rows: 0
  return tokens.reshape(2 * b, t), mask.reshape(2 * b, t), valid


def load_frozen_model(path: str, model_cfg: ModelConfig, mesh, rules, what: str):
  """A model that a recipe keeps frozen (any checkpoint llama_jax.load reads), loaded straight into
  the mesh's shards; its shape must be the config's."""
  from llama_jax.api import load
  loaded = load(path, mesh=mesh, rules=rules)
  loop.check_shape(loaded.config, f"{what} {path}", model_cfg)
  return loaded
