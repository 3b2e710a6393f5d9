"""LoRA in the training loop: which parameters the optimiser sees, and how the model sees them.

A run with `config.lora.rank > 0` keeps two trees in its `TrainState`: `params`, the adapters (the
only parameters with gradients and optimiser state, and all that its checkpoints hold), and
`frozen`, the base model (the run's init_from, quantized if `lora.quantize_base` asks; never
updated, never saved). The loss sees `attach(frozen, params)`: the base weights with the adapters
beside them, applied by `model._project`. Gradients are taken with respect to the adapters only, so
the base needs neither gradient buffers nor optimiser moments. A recipe's own heads (a reward
model's `score`) start untrained, so they train whole beside the adapters (PEFT's
`modules_to_save`). Every recipe built on `train.step.gradient_step` with `Training.view`
(pretraining, SFT, reward models, DPO, whose reference is then the frozen base) accepts
`config.lora`; PPO refuses it.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax

from llama_jax import checkpoint, projection
from llama_jax import model as M
from llama_jax.config import ModelConfig
from llama_jax.lora import adapters as adapters_lib
from llama_jax.lora import files
from llama_jax.lora.config import LoraConfig, from_run_config
from llama_jax.sharding import ConfigError


class Adapters:
  """A run's LoRA: built by `plan` from its config, used by `train.loop.make_training`."""

  def __init__(self, lora: LoraConfig, model_cfg: ModelConfig, seed: int, init_from: str = ""):
    self.lora, self.model_cfg, self.seed, self.init_from = lora, model_cfg, int(seed), init_from
    # Which base weights are quantized: the init_from checkpoint's, or lora.quantize_base's; a
    # run's base has the same structure whether it is loaded or (without init_from) made here.
    self.base_quantization = files.base_quantization(lora, model_cfg, init_from)

  def init(self, rng: jax.Array) -> Any:
    """Fresh adapters, boxed with their logical axes."""
    return adapters_lib.init_adapters(self.model_cfg, self.lora, jax.random.fold_in(rng, 0x10A))

  def base(self, params: Any) -> Any:
    """The frozen base from a model's (possibly boxed) parameters."""
    return files.prepare_base(nn.unbox(params), self.base_quantization)

  def split(self, params: Any, rng: jax.Array) -> tuple[Any, Any]:
    """(what trains, the frozen base) of a recipe's parameter tree: fresh adapters beside the
    recipe's own heads (a reward model's score), which start untrained and so train whole; the
    model's parameters are the base."""
    heads = {k: v for k, v in params.items() if k not in M.MODEL_KEYS}
    model = {k: v for k, v in params.items() if k in M.MODEL_KEYS}
    return {**self.init(rng), **heads}, self.base(model)

  def _attached(self, params: Any, frozen: Any, key: jax.Array | None) -> Any:
    heads = {k: v for k, v in params.items() if k != "layers"}  # the adapters are under "layers"
    return {**adapters_lib.attach(frozen, params, self.lora, key), **heads}

  def view(self, params: Any, frozen: Any, draw: jax.Array) -> Any:
    """What the loss applies the model to: the base with the adapters attached (and the recipe's
    heads), with a dropout key of its own for each `draw` (a step's micro-batch: a function of the
    seed, the step and the micro-batch, so a resumed run draws the same masks)."""
    key = None
    if self.lora.dropout:
      key = jax.random.fold_in(jax.random.key(self.seed ^ 0x10A), draw)
    return self._attached(params, frozen, key)

  def eval_view(self, params: Any, frozen: Any) -> Any:
    return self._attached(params, frozen, None)

  def frozen_shardings(self, abstract_frozen: Any, plain_shardings: Any) -> Any:
    """The base's shardings: the model's, quantized weights following them."""
    return projection.shardings_like(abstract_frozen, plain_shardings)

  def check_base(self, workdir: str, frozen: Any, resuming: bool) -> str:
    """The base's fingerprint, checked against lora.json's where the run resumes: a run that
    resumes onto another base than the one its adapters were trained on is an error (a fresh run
    has no adapters yet: its lora.json, if any, is a killed run's, and is rewritten). Writes
    nothing."""
    fingerprint = adapters_lib.fingerprint(frozen)  # every process: a device computation
    if resuming and os.path.isfile(os.path.join(workdir, checkpoint.LORA)):
      _, info = files.read_info(workdir)
      if info.get("base_fingerprint") not in (None, fingerprint):
        raise ConfigError(f"{workdir}: its adapters were trained on a base with hash "
                          f"{info['base_fingerprint']} ({info.get('base') or 'a random initialisation'}), "
                          f"but this run's base ({self.init_from or 'a random initialisation'}) has hash "
                          f"{fingerprint}")
    return fingerprint

  def write_info(self, workdir: str, fingerprint: str) -> None:
    """lora.json in the workdir: the adapters' settings and which base they belong to."""
    files.write_info(workdir, self.lora, self.init_from, fingerprint)


def forget(workdir: str) -> None:
  """Removes a workdir's lora.json (a full training run starting there: its checkpoints will hold
  the whole model, and readers must not take them for adapters)."""
  try:
    os.remove(os.path.join(workdir, checkpoint.LORA))
  except FileNotFoundError:
    pass


def settings(config) -> LoraConfig | None:
  """A training config's LoRA settings, or None where LoRA is off (`config.lora.rank` 0)."""
  try:
    return from_run_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_resume(workdir: str, lora: LoraConfig | None) -> None:
  """A resumed run trains what the workdir's checkpoints hold: adapters with the same settings
  (rank, alpha, targets, base quantization; dropout may change), or the whole model."""
  if not os.path.isfile(os.path.join(workdir, checkpoint.LORA)):
    if lora is not None:
      raise ConfigError(f"{workdir}: its checkpoints hold a whole model, not LoRA adapters: resume it "
                        "with config.lora.rank=0, or start the LoRA run in another workdir")
    return
  saved, _ = files.read_info(workdir)
  if lora is None:
    raise ConfigError(f"{workdir}: its checkpoints hold LoRA adapters (lora.json): resume it with the "
                      f"same config.lora (rank {saved.rank})")
  for name in ("rank", "alpha", "target_modules", "quantize_base"):
    if getattr(saved, name) != getattr(lora, name):
      raise ConfigError(f"{workdir}: its adapters have lora.{name} {getattr(saved, name)!r} but the config "
                        f"asks for {getattr(lora, name)!r}")


def plan(config, model_cfg: ModelConfig) -> Adapters | None:
  """The run's LoRA, or None where every parameter trains (`config.lora.rank` 0, or no block)."""
  lora = settings(config)
  return None if lora is None else Adapters(lora, model_cfg, config.seed, config.init_from)
