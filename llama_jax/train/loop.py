"""The training loop: `train_and_evaluate(config, workdir, recipe)`.

One jitted `train_step` over a `data x fsdp x tensor` mesh; sharded initialisation; Orbax
checkpoints that resume exactly (parameters, optimiser state, step and data-iterator state), from
the newest checkpoint that reads; SIGTERM/SIGINT save and exit; metrics to `workdir/metrics.jsonl`
and TensorBoard.

A run holds its workdir alone (`workdir.hold`) and checks everything (the config against the
workdir's model, init_from, the tokenizer, the data's first batch) before it writes a byte there,
so a refused run leaves the workdir as it found it.

What is trained is a recipe (`config.recipe`): `LanguageModel` here (pretraining and SFT, the
default "lm"); `llama_jax.align` has "reward", "dpo" and "ppo". A recipe supplies the state's
initialisation and shardings, the step, the data and the evaluation; the loop is the same.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import re
import shutil
import signal
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llama_jax import checkpoint, data, sharding
from llama_jax.config import ModelConfig
from llama_jax.lora import training as lora_training
from llama_jax.model import init_params
from llama_jax.sharding import ConfigError
from llama_jax.tokenizer import Tokenizer, has_tokenizer, load_tokenizer
from llama_jax.train import metrics as metrics_lib
from llama_jax.train import optimizer as optimizer_lib
from llama_jax.train import workdir as workdir_lib
from llama_jax.train.optimizer import learning_rate_schedule, make_optimizer
from llama_jax.train.step import TrainState, eval_step, make_train_step

log = logging.getLogger("llama_jax")


class TrainingError(RuntimeError):
  """The run cannot go on (a non-finite loss, ...); the last good checkpoint is kept."""


class DeviceOutOfMemory(TrainingError):
  """The run does not fit its devices' memory: XLA's own line, then what would make it fit."""


def out_of_memory(error: Exception, config) -> DeviceOutOfMemory | None:
  """XLA's RESOURCE_EXHAUSTED (an allocation the device's memory pool cannot give) as one line with
  the knobs that shrink a step, or None for any other error. JAX's pool is a share of each device
  (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default): on 80 GB cards that default leaves 60 GB, which
  holds neither `configs/llama2_7b.py` nor `configs/llama2_13b.py`."""
  text = str(error)
  if not text.lstrip().startswith("RESOURCE_EXHAUSTED"):  # (a launch's resource limits say INTERNAL first)
    return None
  found = re.search(r"Out of memory.*?(?=\.\s|\s\[|$)", text, re.MULTILINE)
  what = found.group(0).strip() if found else text.strip().splitlines()[0]
  fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
  pool = (f"JAX takes XLA_PYTHON_CLIENT_MEM_FRACTION={fraction} of each GPU" if fraction else
          "On GPUs JAX takes 0.75 of each by default (XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 gives it more)")
  policy = config.model.get("remat_policy", "none")
  lighter = {"dots_no_batch": "'full'", "full": None}.get(policy, "'dots_no_batch' or 'full'")
  remat = f"model.remat_policy {lighter} (now {policy!r}), " if lighter else ""
  return DeviceOutOfMemory(
      f"the device ran out of memory ({what}). {pool}; a step takes less with a smaller batch_size "
      f"({config.batch_size}; optimizer.grad_accum_steps keeps the batch), {remat}"
      f"optimizer.moments_dtype='bfloat16' (now {config.optimizer.get('moments_dtype', 'float32')!r}), "
      f"or the parameters and optimizer state sharded over more devices (mesh.fsdp). XLA's report of "
      f"the largest buffers: LLAMA_JAX_TRACEBACK=1")


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop polls, so it can save before exiting; says so at once.

  LLAMA_JAX_PREEMPT_AT_STEP=N sends this process a signal after step N (LLAMA_JAX_PREEMPT_SIGNAL,
  default SIGTERM; SIGINT is a Ctrl-C, SIGKILL a crash): a preemption at a known step, through the
  real handler, for tests and for rehearsing a cluster's preemption handling."""

  def __init__(self):
    self.signum = 0
    self._previous = {}
    self._preempt_at = int(os.environ.get("LLAMA_JAX_PREEMPT_AT_STEP") or 0)
    self._preempt_with = signal.Signals[os.environ.get("LLAMA_JAX_PREEMPT_SIGNAL") or "SIGTERM"]

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum:  # a second signal: give up on saving
      signal.signal(signum, self._previous[signum])
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    if jax.process_index() == 0:  # now, not at the end of the step: a silence invites a second one
      name = signal.Signals(signum).name
      os.write(2, f"\ninterrupted ({name}): saving a checkpoint after this step, then exiting; interrupt "
                  "again to exit at once without saving\n".encode())

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self, step: int, sync_every: int) -> bool:
    if step == self._preempt_at:
      signal.raise_signal(self._preempt_with)
    if jax.process_count() == 1:
      return bool(self.signum)
    if step % sync_every:  # agreeing across hosts is a collective: not every step
      return False
    flags = multihost_utils.process_allgather(np.array([self.signum], np.int32))
    return bool(np.any(flags))


def validate(config, model_cfg: ModelConfig, mesh) -> None:
  sharding.check_divisible(mesh, config.batch_size, model_cfg.n_heads, model_cfg.n_kv_heads, config.mesh.rules)
  sharding.check_params_divisible(model_cfg, mesh, config.mesh.rules)
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
  rows = process_rows(mesh, config.mesh.rules, config.batch_size, config.seq_len)
  if rows != config.batch_size // jax.process_count():
    # Each process feeds rows of its own (make_array_from_process_local_data): were a block of rows
    # held by devices of two processes (the batch axes smaller than the process count, e.g. tensor
    # parallelism across hosts), each would feed it different data, silently.
    raise ConfigError(f"this mesh gives each of the {jax.process_count()} processes {rows} rows of a batch of "
                      f"{config.batch_size}, not a share of its own: the batch axes (mesh.data x mesh.fsdp) "
                      "must split over the processes (keep mesh.tensor within a host)")
  if config.seq_len > model_cfg.max_seq_len:
    raise ConfigError(f"seq_len {config.seq_len} exceeds model.max_seq_len {model_cfg.max_seq_len}")
  for name in ("log_every",):
    if int(config[name]) < 1:
      raise ConfigError(f"{name} must be >= 1, got {config[name]}")
  for name in ("eval_every", "checkpoint_every"):
    if int(config[name]) < 0:
      raise ConfigError(f"{name} must be >= 0 (0: never), got {config[name]}")
  if config.eval_every and int(config.data.eval_batches) < 1:
    raise ConfigError(f"data.eval_batches must be >= 1 with evaluation on (eval_every {config.eval_every}), "
                      f"got {config.data.eval_batches}")
  if config.num_steps < 0:
    raise ConfigError(f"num_steps must be positive (or 0: as many as the data gives), got {config.num_steps}")
  try:
    optimizer_lib.validate(config.optimizer)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def process_rows(mesh, rules, batch_size: int, seq_len: int) -> int:
  """The rows of a (batch_size, seq_len) batch that this process's devices hold."""
  placed = sharding.batch_sharding(mesh, sharding.as_rules(rules))
  blocks = {index[0].indices(batch_size)
            for index in placed.addressable_devices_indices_map((batch_size, seq_len)).values()}
  return sum(len(range(*block)) for block in blocks)


def _global_batch(local: dict, batch_sharding) -> dict:
  """Each process's rows -> one global array per field, split over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}


def _tokenizer_source(config, workdir: str) -> str:
  """Where the run's tokenizer is read from (nothing is written to the workdir yet): the workdir's
  own; on first use data.tokenizer if set, else the init_from checkpoint's (so fine-tuning keeps its
  vocabulary, chat template and EOS ids), else one trained on the sources (cached outside the
  workdir). Process 0 decides; every process gets its path."""
  source = None
  if jax.process_index() == 0:
    source = workdir
    if not has_tokenizer(workdir):
      source = None
      if config.init_from and not config.data.tokenizer:
        from llama_jax.convert.source import open_source
        source = open_source(config.init_from).tokenizer_path
      source = source or data.ensure_tokenizer(config.data, workdir)
  source = checkpoint.gather_json(source)[0]
  if not os.path.exists(source):
    raise ConfigError(f"the tokenizer {source} is not visible on process {jax.process_index()}: give "
                      "data.tokenizer (or data.cache_dir) a path that every host sees")
  return source


def _prepare_workdir(config, workdir: str, model_cfg: ModelConfig, tokenizer: Tokenizer) -> None:
  """After every check: the tokenizer, the model config and the run config into the workdir, each
  written whole, and only where it changed (re-running a finished run rewrites nothing)."""
  if jax.process_index() == 0:
    if os.path.abspath(tokenizer.folder) != os.path.abspath(workdir):
      _save_tokenizer(tokenizer, workdir)
    workdir_lib.write_if_changed(os.path.join(workdir, checkpoint.MODEL_CONFIG),
                                 checkpoint.model_config_json(model_cfg))
    workdir_lib.write_if_changed(os.path.join(workdir, checkpoint.RUN_CONFIG), config.to_json_best_effort(indent=2))
  multihost_utils.sync_global_devices("workdir ready")


def _save_tokenizer(tokenizer: Tokenizer, workdir: str) -> None:
  """Written beside, then moved in with the tokenizer's own file last: a workdir that has that
  file has the rest (a run killed mid-write starts over)."""
  tmp = os.path.join(workdir, "tokenizer.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tokenizer.save(tmp)
  for name in sorted(os.listdir(tmp), key=lambda n: n in ("tokenizer.json", checkpoint.TOKENIZER)):
    os.replace(os.path.join(tmp, name), os.path.join(workdir, name))
  os.rmdir(tmp)


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
  eval: Callable  # (state, batch) -> the recipe's evaluation sums (the LM: sum of NLL, token count)
  # LoRA (`config.lora.rank` > 0): the adapters (and a recipe's heads) train, the base model is
  # `state.frozen`; None where every parameter trains.
  adapters: lora_training.Adapters | None = None
  init_frozen: Callable | None = None  # rng -> the frozen base of a run without init_from

  def placed(self, field: str):
    """Restore targets: the abstract `field` of the state with this mesh's shardings."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        getattr(self.abstract_state, field), getattr(self.state_sharding, field))

  @property
  def view(self) -> Callable | None:
    """For `train.step.gradient_step`: (params, frozen, draw) -> what the model is applied to (LoRA:
    the frozen base with the adapters attached, their dropout keyed by the step's micro-batch);
    None where `params` is the model."""
    return None if self.adapters is None else self.adapters.view

  def model_params(self, state: TrainState) -> Any:
    """What the model is evaluated with: `state.params`, or (LoRA) the frozen base with the adapters
    attached, no dropout. Jittable."""
    return state.params if self.adapters is None else self.adapters.eval_view(state.params, state.frozen)

  def frozen(self, base: Any) -> Any:
    """A LoRA run's frozen base from a loaded model's parameters (None: the run's own random
    initialisation, from config.seed), placed; only the parts the recipe's model has (a reward
    model has no output head). None where every parameter trains."""
    if self.adapters is None:
      return None
    if base is None:
      return self.init_frozen(jax.random.key(self.adapters.seed))
    base = {k: v for k, v in base.items() if k in self.abstract_state.frozen}
    return jax.jit(self.adapters.base, out_shardings=self.state_sharding.frozen)(base)


def make_training(config, model_cfg: ModelConfig, mesh, params_fn=init_params) -> Training:
  """The LM's training; other recipes pass `params_fn(cfg, rng) -> boxed params` (the model with a
  head of their own) and replace `step` and `eval`. The one place the optimiser meets the
  parameters it trains."""
  rules = sharding.as_rules(config.mesh.rules)
  lr_schedule = learning_rate_schedule(config.optimizer, config.num_steps)
  tx = make_optimizer(config.optimizer, config.num_steps)
  adapters = lora_training.plan(config, model_cfg)  # None unless config.lora trains adapters only

  def init_state(rng):
    params, frozen = params_fn(model_cfg, rng), None
    if adapters is not None:  # fresh adapters and the recipe's heads train; the model is frozen
      params, frozen = adapters.split(params, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      nonfinite_steps=jnp.zeros((), jnp.int32), frozen=frozen)

  # eval_shape -> logical specs -> shardings -> jit(init, out_shardings): the flax lm1b recipe.
  boxed = jax.eval_shape(init_state, jax.random.key(0))
  state_sharding = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  if adapters is not None:  # the base as the model's parameters are placed, quantized or not
    plain = sharding.param_shardings(model_cfg, mesh, rules)
    state_sharding = state_sharding.replace(frozen=adapters.frozen_shardings(
        nn.unbox(boxed.frozen), {k: plain[k] for k in boxed.frozen}))
  batch_sharding = sharding.batch_sharding(mesh, rules)
  init = jax.jit(lambda rng: nn.unbox(init_state(rng)), out_shardings=state_sharding)
  document_attention = bool(config.data.get("document_attention", False))
  step = jax.jit(make_train_step(model_cfg, tx, config.optimizer, lr_schedule, document_attention,
                                 view=adapters.view if adapters else None),
                 in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None),
                 donate_argnums=0)
  init_frozen = None
  if adapters is not None:
    init_frozen = jax.jit(lambda rng: nn.unbox(init_state(rng)).frozen, out_shardings=state_sharding.frozen)
  run = Training(tx, lr_schedule, nn.unbox(boxed), state_sharding, batch_sharding, init, step, None,
                 adapters, init_frozen)
  run.eval = jax.jit(lambda state, batch: eval_step(run.model_params(state), batch, cfg=model_cfg,
                                                    document_attention=document_attention),
                     in_shardings=(state_sharding, batch_sharding))
  return run


class LanguageModel:
  """The recipe "lm": next-token prediction on packed text or conversations (pretraining, SFT).

  A recipe is all the loop asks of what it trains; llama_jax.align's ("reward", "dpo", "ppo")
  have the same methods."""
  metric = "train/loss"  # shown on the progress bar

  def count_steps(self, config, tokenizer) -> int:
    """num_steps 0: the steps the data's epoch limits give."""
    return data.count_batches(config.data, tokenizer, seq_len=config.seq_len,
                              global_batch_size=config.batch_size, seed=config.seed,
                              process_index=jax.process_index(), process_count=jax.process_count())

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
    return state_from_pretrained(loaded, run)

  def evaluate(self, config, run: Training, state: TrainState, tokenizer) -> dict:
    return _evaluate(config, self, run.eval, state, tokenizer, run.batch_sharding)

  def throughput(self, config, model_cfg: ModelConfig) -> tuple[int, float]:
    """(tokens, model FLOPs) of one step, for perf/tokens_per_s and perf/mfu (FLOPs 0: no MFU)."""
    tokens = config.batch_size * config.seq_len
    frozen = lora_training.settings(config) is not None  # LoRA: the base gets no weight gradients
    return tokens, metrics_lib.flops_per_token(model_cfg, config.seq_len, frozen) * tokens


def train_and_evaluate(config, workdir: str, recipe=None) -> dict:
  """Trains `recipe` (default: the language model, config.recipe "lm") until `config.num_steps`
  (resuming from `workdir` if it holds a checkpoint); returns the last logged metrics. A run that
  does not fit the devices' memory raises `DeviceOutOfMemory` (one line, what to change)."""
  try:
    return _train_and_evaluate(config, workdir, recipe)
  except jax.errors.JaxRuntimeError as e:
    oom = out_of_memory(e, config)
    if oom is None:
      raise
    raise oom from e


def _train_and_evaluate(config, workdir: str, recipe=None) -> dict:
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
  workdir_lib.check_path(workdir)

  with workdir_lib.hold(workdir, jax.process_index() == 0, checkpoint.gather_json):
    resuming = bool(checkpoint.checkpoint_steps(workdir))
    lora = lora_training.settings(config)  # None unless config.lora trains adapters only
    if resuming:
      workdir_lib.check_same_model(workdir, model_cfg)
      lora_training.check_resume(workdir, lora)
    # A LoRA run's checkpoints hold its adapters only: resuming loads the frozen base again.
    load_base = bool(config.init_from) and (not resuming or lora is not None)
    if load_base:
      _check_init_from(config.init_from, model_cfg, lora is not None)
    tokenizer = load_tokenizer(_tokenizer_source(config, workdir))
    if tokenizer.vocab_size > model_cfg.vocab_size:
      raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size is "
                        f"{model_cfg.vocab_size}")
    if config.num_steps == 0:  # a fine-tuning run: as many steps as the data's epoch limits give
      config.num_steps = _fewest_over_processes(recipe.count_steps(config, tokenizer))
      log.info("num_steps: %d (the data's epochs)", config.num_steps)

    run = recipe.make_training(config, model_cfg, mesh)
    train_iter = recipe.make_iterator(config, tokenizer, "train")
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints, create=False) if resuming else None
    try:
      pretrained = None
      if load_base:
        # Straight into the mesh's shards: no device ever holds the whole model. Loaded outside the
        # activation rules, which would bind the restore's own abstract targets to this mesh.
        pretrained = recipe.load_pretrained(config, mesh, rules)
      with sharding.activation_rules(mesh, rules):
        if resuming:
          state, start_step = _resume(workdir, manager, run, train_iter,
                                      run.frozen(pretrained.params if pretrained else None), config)
        elif pretrained is not None:
          state = recipe.from_pretrained(pretrained, config, model_cfg, run)
          start_step = 0
        else:
          state = run.init(jax.random.key(config.seed))
          start_step = 0
        del pretrained  # a LoRA run keeps its base in state.frozen; nothing else needs it
        if resuming:
          _say_what_resuming_changes(config, workdir, start_step)
        base_fingerprint = (run.adapters.check_base(workdir, state.frozen, resuming)
                            if run.adapters else None)
        first = _first_batch(config, train_iter, start_step)
        _check_eval_data(config, recipe, tokenizer)
        # Everything checked: from here on the run writes into its workdir.
        _prepare_workdir(config, workdir, model_cfg, tokenizer)
        if jax.process_index() == 0:
          if run.adapters is not None:
            run.adapters.write_info(workdir, base_fingerprint)
          elif not resuming:  # a LoRA run killed before its first checkpoint left it: not this run's
            lora_training.forget(workdir)
        manager = manager or checkpoint.make_manager(workdir, config.keep_checkpoints)
        batches = itertools.chain([first] if first is not None else [], train_iter)
        evaluate = functools.partial(recipe.evaluate, config, run, tokenizer=tokenizer)
        return _loop(config, workdir, model_cfg, state, start_step, run, recipe, evaluate, batches,
                     train_iter, manager)
    finally:
      train_iter.close()
      if manager is not None:
        manager.close()  # waits for the last save, before the lock is let go


def _check_init_from(path: str, model_cfg: ModelConfig, trains_adapters: bool) -> None:
  """Fine-tuning: the checkpoint exists, reads, and has the config's shape (its parameters are
  loaded only once everything else is checked too); a quantized one is a LoRA run's frozen base."""
  from llama_jax.convert import source
  try:
    src = source.open_source(path)
  except checkpoint.CheckpointError as e:
    raise ConfigError(f"init_from {e}") from None
  check_shape(src.config, f"init_from {path}", model_cfg)
  if src.quantization and not trains_adapters:
    raise ConfigError(f"init_from {path} is quantized: its integer weights do not train; train LoRA "
                      "adapters over it (config.lora.rank > 0) or start from the float model")
  if src.kind == "lora":
    from llama_jax.lora import files
    lora, info = files.read_info(path)
    if files.base_quantization(lora, src.config, info.get("base") or ""):
      # Loaded, its adapters stay attached to integer weights: nothing a run can start from.
      raise ConfigError(f"init_from {path} is a LoRA run over a quantized base: train new adapters over "
                        f"that base (init_from {info.get('base') or 'its base'}), or merge the adapters "
                        "into a float copy of the base first")


POSITION_FIELDS = ("rope_theta", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
                   "rope_high_freq_factor", "rope_original_max_seq_len")


def check_shape(loaded: ModelConfig, what: str, model_cfg: ModelConfig) -> None:
  """A checkpoint's shape is the config's, or a one-line error naming the field. Rotary settings
  that differ are said, not refused: a fine-tune that stretches the positions (linear scaling over
  a plain model) changes them on purpose; a config that forgot a Llama 3.1's scaling does not."""
  shape_fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "tie_embeddings")
  for name in shape_fields:
    if getattr(loaded, name) != getattr(model_cfg, name):
      raise ConfigError(f"{what}: model.{name} is {getattr(model_cfg, name)} in the config "
                        f"but {getattr(loaded, name)} in the checkpoint")
  differing = [f"model.{name} {getattr(model_cfg, name)} (the checkpoint's: {getattr(loaded, name)})"
               for name in POSITION_FIELDS if getattr(loaded, name) != getattr(model_cfg, name)
               and (name in ("rope_theta", "rope_scaling") or "none" not in (loaded.rope_scaling, model_cfg.rope_scaling))]
  if differing:
    _say(f"warning: {what}: this run's positions are not the checkpoint's: {', '.join(differing)}; "
         "set them as the checkpoint has them unless the change is meant")


def _say(line: str) -> None:
  if jax.process_index() == 0:
    print(line, file=sys.stderr, flush=True)


def _resume(workdir: str, manager, run: Training, train_iter, frozen: Any, config) -> tuple[TrainState, int]:
  """The state of the newest checkpoint that reads (`frozen`: a LoRA run's base, which its
  checkpoints do not hold); unreadable newer ones are named, one line each, and moved aside (never
  deleted) once an older one has restored."""
  step, (params, opt_state, meta, data_states), skipped = checkpoint.restore_newest(
      manager, run.placed("params"), run.placed("opt_state"), warn=lambda m: _say(f"warning: {m}"))
  saved_seed = (meta or {}).get("seed")
  if saved_seed is not None and int(saved_seed) != int(config.seed):
    # The seed orders each epoch's files: the saved position in that order would point elsewhere.
    raise ConfigError(f"the run in {workdir} was started with seed {saved_seed}; resuming it with seed "
                      f"{config.seed} would skip or repeat data (--config.seed={saved_seed})")
  data_state = data.resume_state(data_states, config.data, jax.process_index(), jax.process_count())
  state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state,
                     nonfinite_steps=jnp.zeros((), jnp.int32), frozen=frozen)
  state = jax.device_put(state, run.state_sharding)
  train_iter.set_state(data_state)
  if skipped:
    moved = checkpoint.set_aside(manager, skipped)
    where = (f"step {skipped[0]} is kept in {moved[0]}" if len(skipped) == 1 else
             f"steps {', '.join(map(str, skipped))} are kept in {os.path.dirname(moved[0])}") if moved else ""
    _say(f"resumed from step {step}; the unreadable {where}")
  else:
    log.info("resumed from %s at step %d", workdir, step)
  return state, step


def _say_what_resuming_changes(config, workdir: str, start_step: int) -> None:
  """A resumed run whose num_steps leaves nothing to train, or that moves where the schedule ends,
  says so: both are otherwise silent (an exit with nothing done; a cosine bent mid-run)."""
  if start_step >= config.num_steps:
    _say(f"the run in {workdir} is at step {start_step} and num_steps is {config.num_steps}: nothing to "
         f"train (a larger --config.num_steps continues it)")
    return
  try:
    with open(os.path.join(workdir, checkpoint.RUN_CONFIG)) as f:
      before = int(json.load(f).get("num_steps", 0))
  except (OSError, ValueError, TypeError):  # no config of the run's, or not one this reads
    return
  if before and before != config.num_steps:
    _say(f"num_steps {config.num_steps}, where the run in {workdir} had {before}: from step {start_step} "
         f"the learning-rate schedule decays to step {config.num_steps}")


def _first_batch(config, train_iter, start_step: int) -> dict | None:
  """The run's first batch, read before anything is written (data that give none are refused
  then); None when a resumed run's data are already exhausted."""
  if start_step >= config.num_steps:
    return None
  batch = next_batch(train_iter, agree=jax.process_count() > 1)  # a share that fails fails every process
  if batch is None and not start_step:
    raise data.DataError(f"data.sources give not one batch of {config.batch_size} sequences of "
                         f"{config.seq_len} tokens before every source reaches its epoch limit")
  return batch


def _fewest_over_processes(steps: int) -> int:
  """num_steps 0: the steps of the process whose share of the data ends first, where every process
  stops (`next_batch`), so that the schedule ends where training does."""
  if jax.process_count() > 1:
    steps = int(np.min(multihost_utils.process_allgather(np.array([steps], np.int64))))
  if steps == 0:
    raise data.DataError("a process's share of the training data gives no batch: more data, fewer "
                         "processes, or data.shard_by='replicated'")
  return steps


def _check_eval_data(config, recipe, tokenizer) -> None:
  """With evaluation on, its data give a batch: found before anything is written, not after
  eval_every steps of training."""
  if not config.eval_every:
    return
  it = recipe.make_iterator(config, tokenizer, "eval")
  try:
    # Every process asks: one whose split is empty must not raise alone while the others go on
    # into the step's collectives and wait for it.
    if next_batch(it, agree=jax.process_count() > 1) is None:
      raise data.DataError(f"eval_every is {config.eval_every} but the validation split gives not one "
                           f"batch of {config.batch_size} sequences of {config.seq_len} tokens"
                           f"{' on every process' if jax.process_count() > 1 else ''}: more held-out "
                           "text (data.holdout_every, data.eval_sources), or eval_every 0")
  finally:
    it.close()


def state_from_pretrained(loaded, run: Training, params: Any = None) -> TrainState:
  """Fine-tuning: parameters of a loaded checkpoint (any kind, its shape checked by
  `_check_init_from`), or `params` made from them (with a recipe's head), and a fresh optimiser
  state. A LoRA run trains fresh adapters (and the recipe's heads) beside them, frozen."""
  params = loaded.params if params is None else params
  frozen = None
  if run.adapters is not None:
    frozen = run.frozen(params)
    heads = {k: v for k, v in params.items() if k not in run.abstract_state.frozen}
    rng = jax.random.key(run.adapters.seed)
    params = jax.jit(lambda h: {**nn.unbox(run.adapters.init(rng)), **h},
                     out_shardings=run.state_sharding.params)(heads)
  params = jax.device_put(params, run.state_sharding.params)
  init_opt = jax.jit(run.tx.init, out_shardings=run.state_sharding.opt_state)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=init_opt(params),
                    nonfinite_steps=jnp.zeros((), jnp.int32), frozen=frozen)


def _evaluate(config, recipe, eval_fn, state, tokenizer, batch_sharding) -> dict:
  it = recipe.make_iterator(config, tokenizer, "eval")
  nll, count = 0.0, 0.0
  for _ in range(int(config.data.eval_batches)):
    local = next_batch(it, agree=jax.process_count() > 1)  # held-out data end: agree, as training does
    if local is None:
      break
    batch_nll, batch_count = eval_fn(state, _global_batch(local, batch_sharding))
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


def progress_bar(total: int, initial: int, enabled: bool, file=None):
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step", file=file)


def restart_clock(bar, step: int) -> None:
  """Counts `bar`'s rate and ETA from the end of the first step: its time is compilation (minutes
  for a large model), and tqdm's average would carry it into the ETA for many steps."""
  bar.reset(total=bar.total)
  bar.n = bar.initial = bar.last_print_n = step
  bar.refresh()


def _finite(config) -> bool:
  """Whether the training data end: every source has an epoch limit (else one repeats forever)."""
  return all(s["epochs"] for s in data.resolve_sources(config.data, "train"))


def next_batch(batches, agree: bool) -> dict | None:
  """This process's next batch, or None once the data are exhausted. With `agree` (several
  processes) the processes agree every call: each packs rows of its own and they can run out
  batches apart, and one that left for other collectives (the final save's, the training step
  after an evaluation) while another still ran a step would deadlock both. They stop together, at
  the first process's end (the others' extra batch is dropped); a process whose share of the data
  fails (an empty share) fails every process, not itself alone."""
  failed = None
  try:
    local = next(batches)
  except StopIteration:
    local = None
  except data.DataError as e:
    if not agree:
      raise
    local, failed = None, e
  if not agree:
    return local
  states = multihost_utils.process_allgather(np.array([2 if failed else local is None], np.int32)).ravel()
  if failed is not None:
    raise failed
  if np.any(states == 2):
    raise data.DataError(f"the data of process(es) {', '.join(map(str, np.flatnonzero(states == 2)))} "
                         "failed (their error is in their output)")
  return None if np.any(states) else local


def _loop(config, workdir, model_cfg, state, start_step, run: Training, recipe, evaluate, batches,
          train_iter, manager) -> dict:
  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, start_step=start_step)
  tokens_per_step, flops_per_step = recipe.throughput(config, model_cfg)
  peak = config.peak_flops_per_device or metrics_lib.peak_flops(jax.devices()[0], model_cfg.dtype)
  last: dict = {}

  def save(step, force=False):
    check_finite(step)
    checkpoint.save_state(manager, step, state, config.seed, train_iter.get_state(), force=force)

  def check_finite(step):
    if int(state.nonfinite_steps):
      kept = manager.latest_step()
      outcome = ("before the first checkpoint: nothing to resume from" if kept is None else
                 f"stopping; the last checkpoint (step {kept}) is kept")
      raise TrainingError(f"non-finite loss or gradient at or before step {step}, {outcome}. Lower "
                          "optimizer.lr or check the data.")

  bar = progress_bar(config.num_steps, start_step, is_main)
  timer = metrics_lib.StepTimer()
  step = start_step
  agree = jax.process_count() > 1 and _finite(config)
  try:
    with _StopSignal() as stop:
      while step < config.num_steps:
        local = next_batch(batches, agree)
        if local is None:  # every source reached its epoch limit
          for event in train_iter.events():
            bar.write(f"data: {event}")
          bar.write(f"data exhausted after {step} steps (every source reached its epoch limit)")
          break
        batch = _global_batch(local, run.batch_sharding)
        state, step_metrics = run.step(state, batch)
        step += 1
        if timer.started:
          timer.count_step()
          bar.update(1)
        else:  # the first step compiles: time from its end
          jax.block_until_ready(step_metrics)
          timer.start()
          restart_clock(bar, step)
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
            if peak and flops_per_step:  # unknown peak (a CPU) or FLOPs: no MFU rather than a made-up one
              row["perf/mfu"] = flops_per_step / step_time / (peak * jax.device_count())
          row.update({f"data/tokens/{k}": v for k, v in _source_tokens(train_iter).items()})
          for event in train_iter.events():
            bar.write(f"data: {event}")
          bar.set_postfix(loss=f"{row[recipe.metric]:.3f}", tok_s=f"{row.get('perf/tokens_per_s', 0):.0f}")

        if config.eval_every and (step % config.eval_every == 0 or last_step):
          jax.block_until_ready(step_metrics)  # the steps so far are training time
          with timer.paused():  # evaluation is not
            eval_row = evaluate(state)
          if eval_row:
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_row.items()))
          row.update(eval_row)

        if row:
          writer.write(step, row)
          last = {**last, **row}

        if config.checkpoint_every and step % config.checkpoint_every == 0 and not last_step:
          save(step)

        if stop.requested(step, config.log_every):
          if manager.latest_step() != step:  # not saved already as a checkpoint_every step
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
  return last
