"""The training loop: `train_and_evaluate(config, workdir, recipe)`.

One jitted `train_step` over a `data x fsdp x tensor` mesh; sharded initialisation; Orbax
checkpoints that resume exactly (parameters, optimiser state, step and data-iterator state);
SIGTERM/SIGINT save and exit; metrics to `workdir/metrics.jsonl` and TensorBoard.

What is trained is a recipe (`config.recipe`): `LanguageModel` here (pretraining and SFT, the
default "lm"); `llama_jax.align` has "reward", "dpo" and "ppo". A recipe supplies the state's
initialisation and shardings, the step, the data and the evaluation; the loop is the same.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import signal
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llama_jax import checkpoint, data, sharding
from llama_jax.config import ModelConfig
from llama_jax.model import init_params
from llama_jax.sharding import ConfigError
from llama_jax.tokenizer import Tokenizer
from llama_jax.train import metrics as metrics_lib
from llama_jax.train.optimizer import learning_rate_schedule, make_optimizer
from llama_jax.train.step import TrainState, eval_step, make_train_step

log = logging.getLogger("llama_jax")


class TrainingError(RuntimeError):
  """The run cannot go on (a non-finite loss, ...); the last good checkpoint is kept."""


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop polls, so it can save before exiting.

  LLAMA_JAX_PREEMPT_AT_STEP=N sends this process a SIGTERM after step N: a preemption at a known
  step, through the real handler, for tests and for rehearsing a cluster's preemption handling."""

  def __init__(self):
    self.signum = 0
    self._previous = {}
    self._preempt_at = int(os.environ.get("LLAMA_JAX_PREEMPT_AT_STEP") or 0)

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum:  # a second signal: give up on saving
      signal.signal(signum, self._previous[signum])
      os.kill(os.getpid(), signum)
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self, step: int, sync_every: int) -> bool:
    if step == self._preempt_at:
      signal.raise_signal(signal.SIGTERM)
    if jax.process_count() == 1:
      return bool(self.signum)
    if step % sync_every:  # agreeing across hosts is a collective: not every step
      return False
    flags = multihost_utils.process_allgather(np.array([self.signum], np.int32))
    return bool(np.any(flags))


def validate(config, model_cfg: ModelConfig, mesh) -> None:
  sharding.check_divisible(mesh, config.batch_size, model_cfg.n_heads, model_cfg.n_kv_heads, config.mesh.rules)
  accum = int(config.optimizer.grad_accum_steps)
  if accum < 1 or config.batch_size % accum:
    raise ConfigError(f"optimizer.grad_accum_steps ({accum}) must divide batch_size ({config.batch_size})")
  if accum > 1:
    try:
      sharding.check_divisible(mesh, config.batch_size // accum, model_cfg.n_heads, model_cfg.n_kv_heads,
                               config.mesh.rules)
    except ConfigError as e:
      raise ConfigError(f"micro-batches (batch_size / optimizer.grad_accum_steps): {e}") from None
  if config.batch_size % jax.process_count():
    raise ConfigError(f"batch_size {config.batch_size} does not divide over {jax.process_count()} processes")
  if config.seq_len > model_cfg.max_seq_len:
    raise ConfigError(f"seq_len {config.seq_len} exceeds model.max_seq_len {model_cfg.max_seq_len}")
  if config.num_steps < 0:
    raise ConfigError(f"num_steps must be positive (or 0: as many as the data gives), got {config.num_steps}")


def _global_batch(local: dict, batch_sharding) -> dict:
  """Each process's rows -> one global array per field, split over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}


def _prepare_workdir(config, workdir: str, model_cfg: ModelConfig) -> str:
  """Tokenizer into the workdir (trained on first use), model config and run config beside it."""
  tok_dest = os.path.join(workdir, checkpoint.TOKENIZER)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    if not os.path.isfile(tok_dest):
      inherited = os.path.join(config.init_from, checkpoint.TOKENIZER) if config.init_from else ""
      if not config.data.tokenizer and os.path.isfile(inherited):
        source = inherited  # fine-tuning keeps the checkpoint's vocabulary
      else:
        source = data.ensure_tokenizer(config.data, workdir)
      if os.path.abspath(source) != os.path.abspath(tok_dest):
        shutil.copyfile(source, tok_dest + ".tmp")
        os.replace(tok_dest + ".tmp", tok_dest)
    checkpoint.write_model_config(workdir, model_cfg)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  multihost_utils.sync_global_devices("workdir ready")
  return tok_dest


@dataclasses.dataclass
class Training:
  """The jitted pieces of a run on one mesh; the benchmark uses them too."""
  tx: Any
  lr_schedule: Any
  abstract_state: TrainState  # ShapeDtypeStructs, unboxed
  state_sharding: TrainState  # NamedShardings
  batch_sharding: Any
  init: Callable  # rng -> sharded TrainState, initialised in place (never whole on one device)
  step: Callable  # (state, batch) -> (state, metrics), state donated
  eval: Callable  # (params, batch) -> (sum of NLL, token count)

  def placed(self, field: str):
    """Restore targets: the abstract `field` of the state with this mesh's shardings."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        getattr(self.abstract_state, field), getattr(self.state_sharding, field))


def make_training(config, model_cfg: ModelConfig, mesh, params_fn=init_params) -> Training:
  """The LM's training; other recipes pass `params_fn(cfg, rng) -> boxed params` (the model with a
  head of their own) and replace `step` and `eval`. The one place the optimiser meets the
  parameters it trains."""
  rules = sharding.as_rules(config.mesh.rules)
  lr_schedule = learning_rate_schedule(config.optimizer, config.num_steps)
  tx = make_optimizer(config.optimizer, config.num_steps)

  def init_state(rng):
    params = params_fn(model_cfg, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      nonfinite_steps=jnp.zeros((), jnp.int32))

  # eval_shape -> logical specs -> shardings -> jit(init, out_shardings): the flax lm1b recipe.
  boxed = jax.eval_shape(init_state, jax.random.key(0))
  state_sharding = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  init = jax.jit(lambda rng: nn.unbox(init_state(rng)), out_shardings=state_sharding)
  document_attention = bool(config.data.get("document_attention", False))
  step = jax.jit(make_train_step(model_cfg, tx, config.optimizer, lr_schedule, document_attention),
                 in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None),
                 donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, cfg=model_cfg, document_attention=document_attention),
                     in_shardings=(state_sharding.params, batch_sharding))
  return Training(tx, lr_schedule, nn.unbox(boxed), state_sharding, batch_sharding, init, step, evaluate)


class LanguageModel:
  """The recipe "lm": next-token prediction on packed text or conversations (pretraining, SFT).

  A recipe is all the loop asks of what it trains; llama_jax.align's ("reward", "dpo", "ppo")
  have the same methods."""
  metric = "train/loss"  # shown on the progress bar

  def count_steps(self, config, tokenizer) -> int:
    """num_steps 0: the steps the data's epoch limits give."""
    return data.count_batches(config.data, tokenizer, seq_len=config.seq_len,
                              global_batch_size=config.batch_size, seed=config.seed)

  def make_training(self, config, model_cfg: ModelConfig, mesh) -> Training:
    return make_training(config, model_cfg, mesh)

  def make_iterator(self, config, tokenizer, split: str):
    return data.make_iterator(
        config.data, tokenizer, seq_len=config.seq_len, global_batch_size=config.batch_size,
        seed=config.seed, split=split, process_index=jax.process_index(),
        process_count=jax.process_count())

  def load_pretrained(self, config, mesh, rules):
    from llama_jax.api import load
    return load(config.init_from, mesh=mesh, rules=rules)

  def from_pretrained(self, loaded, config, model_cfg: ModelConfig, run: Training) -> TrainState:
    return state_from_pretrained(loaded, config.init_from, model_cfg, run)

  def evaluate(self, config, run: Training, params, tokenizer) -> dict:
    return _evaluate(config, self, run.eval, params, tokenizer, run.batch_sharding)

  def throughput(self, config, model_cfg: ModelConfig) -> tuple[int, float]:
    """(tokens, model FLOPs) of one step, for perf/tokens_per_s and perf/mfu (FLOPs 0: no MFU)."""
    tokens = config.batch_size * config.seq_len
    return tokens, metrics_lib.flops_per_token(model_cfg, config.seq_len) * tokens


def train_and_evaluate(config, workdir: str, recipe=None) -> dict:
  """Trains `recipe` (default: the language model, config.recipe "lm") until `config.num_steps`
  (resuming from `workdir` if it holds a checkpoint); returns the last logged metrics."""
  if recipe is None:
    if config.get("recipe", "lm") != "lm":
      raise ConfigError(f"config.recipe {config.recipe!r} is not the language model: pass its recipe "
                        "(llama_jax.align.get_recipe(config)), as train.py does")
    recipe = LanguageModel()
  sharding.initialize_distributed()
  model_cfg = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  rules = sharding.as_rules(config.mesh.rules)
  validate(config, model_cfg, mesh)

  tokenizer = Tokenizer(_prepare_workdir(config, workdir, model_cfg))
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size is "
                      f"{model_cfg.vocab_size}")

  if config.num_steps == 0:  # a fine-tuning run: as many steps as the data's epoch limits give
    config.num_steps = recipe.count_steps(config, tokenizer)
    log.info("num_steps: %d (the data's epochs)", config.num_steps)
  run = recipe.make_training(config, model_cfg, mesh)
  manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
  train_iter = recipe.make_iterator(config, tokenizer, "train")

  start_step = manager.latest_step()
  pretrained = None
  if start_step is None and config.init_from:
    # Straight into the mesh's shards: no device ever holds the whole model. Loaded outside the
    # activation rules, which would bind the restore's own abstract targets to this mesh.
    pretrained = recipe.load_pretrained(config, mesh, rules)
  with sharding.activation_rules(mesh, rules):
    if start_step is not None:
      params, opt_state, meta, data_state = checkpoint.restore_state(
          manager, start_step, run.placed("params"), run.placed("opt_state"))
      state = TrainState(step=jnp.asarray(start_step, jnp.int32), params=params, opt_state=opt_state,
                         nonfinite_steps=jnp.zeros((), jnp.int32))
      state = jax.device_put(state, run.state_sharding)
      train_iter.set_state(data_state)
      log.info("resumed from %s at step %d", workdir, start_step)
    elif pretrained is not None:
      state = recipe.from_pretrained(pretrained, config, model_cfg, run)
      start_step = 0
    else:
      state = run.init(jax.random.key(config.seed))
      start_step = 0
    evaluate = functools.partial(recipe.evaluate, config, run, tokenizer=tokenizer)
    return _loop(config, workdir, model_cfg, state, start_step, run.step, evaluate, train_iter, manager,
                 run.batch_sharding, mesh, recipe)


def check_shape(loaded: ModelConfig, what: str, model_cfg: ModelConfig) -> None:
  """A checkpoint's shape is the config's, or a one-line error naming the field."""
  shape_fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "tie_embeddings")
  for name in shape_fields:
    if getattr(loaded, name) != getattr(model_cfg, name):
      raise ConfigError(f"{what}: model.{name} is {getattr(model_cfg, name)} in the config "
                        f"but {getattr(loaded, name)} in the checkpoint")


def state_from_pretrained(loaded, path: str, model_cfg: ModelConfig, run: Training,
                          params: Any = None) -> TrainState:
  """Fine-tuning: parameters of a loaded checkpoint (any kind), or `params` made from them (with a
  recipe's head), and a fresh optimiser state."""
  check_shape(loaded.config, f"init_from {path}", model_cfg)
  params = jax.device_put(loaded.params if params is None else params, run.state_sharding.params)
  init_opt = jax.jit(run.tx.init, out_shardings=run.state_sharding.opt_state)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=init_opt(params),
                    nonfinite_steps=jnp.zeros((), jnp.int32))


def _evaluate(config, recipe, eval_fn, params, tokenizer, batch_sharding) -> dict:
  it = recipe.make_iterator(config, tokenizer, "eval")
  nll, count = 0.0, 0.0
  for _ in range(int(config.data.eval_batches)):
    try:
      local = next(it)
    except StopIteration:
      break
    batch_nll, batch_count = eval_fn(params, _global_batch(local, batch_sharding))
    nll, count = nll + float(batch_nll), count + float(batch_count)
  if count == 0:
    return {}
  loss = nll / count
  return {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 80.0)))}


def _source_tokens(train_iter) -> dict:
  """Tokens taken from each source so far, summed over processes."""
  per_process = checkpoint.gather_json(train_iter.source_tokens())
  total: dict = {}
  for counts in per_process:
    for name, count in counts.items():
      total[name] = total.get(name, 0) + int(count)
  return total


def _loop(config, workdir, model_cfg, state, start_step, step_fn, eval_fn, train_iter, manager,
          batch_sharding, mesh, recipe) -> dict:
  from tqdm import tqdm

  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  tokens_per_step, flops_per_step = recipe.throughput(config, model_cfg)
  peak = config.peak_flops_per_device or metrics_lib.peak_flops(jax.devices()[0], model_cfg.dtype)
  last: dict = {}

  def save(step, force=False):
    check_finite(step)
    checkpoint.save_state(manager, step, state, config.seed, train_iter.get_state(), force=force)

  def check_finite(step):
    if int(state.nonfinite_steps):
      raise TrainingError(
          f"non-finite loss or gradient at or before step {step}: stopping; the last checkpoint "
          f"(step {manager.latest_step()}) is kept. Lower optimizer.lr or check the data.")

  bar = tqdm(total=config.num_steps, initial=start_step, disable=not is_main, dynamic_ncols=True,
             unit="step")
  timer = metrics_lib.StepTimer()
  step = start_step
  try:
    with _StopSignal() as stop:
      while step < config.num_steps:
        try:
          local = next(train_iter)
        except StopIteration:  # every source reached its epoch limit
          for event in train_iter.events():
            bar.write(f"data: {event}")
          bar.write(f"data exhausted after {step} steps (every source reached its epoch limit)")
          break
        batch = _global_batch(local, batch_sharding)
        state, step_metrics = step_fn(state, batch)
        step += 1
        if timer.started:
          timer.count_step()
        else:  # the first step compiles: time from its end
          jax.block_until_ready(step_metrics)
          timer.start()
        bar.update(1)
        last_step = step == config.num_steps
        row = {}

        if step % config.log_every == 0 or last_step:
          fetched = jax.device_get(step_metrics)  # the only host sync of a logging window
          check_finite(step)
          step_time = timer.lap()
          row.update({k: float(v) for k, v in fetched.items() if k != "train/tokens"})
          if step_time is not None:
            row["perf/step_time_s"] = step_time
            row["perf/tokens_per_s"] = tokens_per_step / step_time
            if peak and flops_per_step:  # unknown peak (a CPU): no MFU rather than a made-up one
              row["perf/mfu"] = flops_per_step / step_time / (peak * jax.device_count())
          row.update({f"data/tokens/{k}": v for k, v in _source_tokens(train_iter).items()})
          for event in train_iter.events():
            bar.write(f"data: {event}")
          bar.set_postfix(loss=f"{row[recipe.metric]:.3f}", tok_s=f"{row.get('perf/tokens_per_s', 0):.0f}")

        if config.eval_every and (step % config.eval_every == 0 or last_step):
          jax.block_until_ready(step_metrics)  # the steps so far are training time
          with timer.paused():  # evaluation is not
            eval_row = eval_fn(state.params)
          if eval_row:
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_row.items()))
          row.update(eval_row)

        if row:
          writer.write(step, row)
          last = {**last, **row}

        if config.checkpoint_every and step % config.checkpoint_every == 0 and not last_step:
          save(step)

        if stop.requested(step, config.log_every):
          save(step, force=True)
          manager.wait_until_finished()
          bar.write(f"stopped by signal {stop.signum} at step {step}; checkpoint saved in {workdir}")
          raise SystemExit(128 + (stop.signum or signal.SIGTERM))

      if manager.latest_step() != step:
        save(step, force=True)
      manager.wait_until_finished()
  finally:
    bar.close()
    writer.close()
    manager.close()
  return last
