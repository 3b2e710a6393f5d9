"""LoRA in the training loop: which parameters the optimiser sees, and how the model sees them.

A run with `config.lora.rank > 0` keeps two trees in its `TrainState`: `params`, the adapters (the
only parameters with gradients and optimiser state, and all that its checkpoints hold), and
`frozen`, the base model (the run's init_from, quantized if `lora.quantize_base` asks; never
updated, never saved). The loss sees `attach(frozen, params)`: the base weights with the adapters
beside them, applied by `model._project`. Gradients are taken with respect to the adapters only, so
the base needs neither gradient buffers nor optimiser moments. Nothing else in the loop changes:
every recipe built on `train_step` (pretraining, SFT, DPO, reward models) accepts `config.lora`.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax

from llama_jax import checkpoint, projection
from llama_jax.config import ModelConfig
from llama_jax.lora import adapters as adapters_lib
from llama_jax.lora import files
from llama_jax.lora.config import LoraConfig, from_run_config


class Adapters:
  """A run's LoRA: built by `plan` from its config, used by `train.loop.make_training`."""

  def __init__(self, lora: LoraConfig, model_cfg: ModelConfig, seed: int, init_from: str = ""):
    self.lora, self.model_cfg, self.seed = lora, model_cfg, int(seed)
    # Which base weights are quantized: the init_from checkpoint's, or lora.quantize_base's; a
    # run's base has the same structure whether it is loaded or (without init_from) made here.
    self.base_quantization = files.base_quantization(lora, model_cfg, init_from)

  def init(self, rng: jax.Array) -> Any:
    """Fresh adapters, boxed with their logical axes."""
    return adapters_lib.init_adapters(self.model_cfg, self.lora, jax.random.fold_in(rng, 0x10A))

  def base(self, params: Any) -> Any:
    """The frozen base from a model's (possibly boxed) parameters."""
    return files.prepare_base(nn.unbox(params), self.base_quantization)

  def view(self, adapters: Any, frozen: Any, step: jax.Array) -> Any:
    """What the loss applies the model to at `step`: the base with the adapters attached, with a
    fresh dropout key each step (a function of the seed and the step, so a resumed run draws the
    same masks)."""
    key = None
    if self.lora.dropout:
      key = jax.random.fold_in(jax.random.key(self.seed ^ 0x10A), step)
    return adapters_lib.attach(frozen, adapters, self.lora, key)

  def eval_view(self, adapters: Any, frozen: Any) -> Any:
    return adapters_lib.attach(frozen, adapters, self.lora)

  def frozen_shardings(self, abstract_frozen: Any, plain_shardings: Any) -> Any:
    """The base's shardings: the model's, quantized weights following them."""
    return projection.shardings_like(abstract_frozen, plain_shardings)

  def record(self, workdir: str, frozen: Any, init_from: str) -> None:
    """lora.json in the workdir: the adapters' settings and which base they belong to. A run that
    resumes onto another base than the one its adapters were trained on is an error."""
    fingerprint = adapters_lib.fingerprint(frozen)  # every process: a device computation
    if os.path.isfile(os.path.join(workdir, checkpoint.LORA)):
      _, info = files.read_info(workdir)
      if info.get("base_fingerprint") not in (None, fingerprint):
        raise ValueError(f"{workdir}: its adapters were trained on a base with hash "
                         f"{info['base_fingerprint']} ({info.get('base') or 'a random initialisation'}), "
                         f"but this run's base ({init_from or 'a random initialisation'}) has hash "
                         f"{fingerprint}")
    if jax.process_index() == 0:
      files.write_info(workdir, self.lora, init_from, fingerprint)


def plan(config, model_cfg: ModelConfig) -> Adapters | None:
  """The run's LoRA, or None where every parameter trains (`config.lora.rank` 0, or no block)."""
  lora = from_run_config(config)
  return None if lora is None else Adapters(lora, model_cfg, config.seed, config.init_from)
