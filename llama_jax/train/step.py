"""The pure training and evaluation steps.

`train_step(state, batch) -> (state, metrics)`: gradients are accumulated over micro-batches with a
`lax.scan`, as sums of token losses divided once by the number of counted tokens, so k micro-batches
of b sequences give exactly the update of one batch of k*b. A step whose loss or gradient is not
finite leaves the state untouched and is counted in `state.nonfinite_steps`; the loop stops on it.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from llama_jax.config import ModelConfig
from llama_jax.train.loss import chunked_cross_entropy_sums, cross_entropy_sums
from llama_jax.model import BATCH, LENGTH, Transformer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_steps: jax.Array  # steps skipped because the loss or gradient was NaN/inf
  # Parameters the model reads but the optimiser does not train (a LoRA run's base model:
  # `llama_jax.lora.training`); not checkpointed. None: `params` is the whole model.
  frozen: Any = None


def _loss_sums(params, cfg: ModelConfig, batch, z_loss: float, document_attention: bool):
  # Without document attention, packed rows attend across document boundaries (plain causal), which
  # lets flash attention use its causal kernel instead of an explicit mask.
  segment_ids = batch["segment_ids"] if document_attention else None
  model = Transformer(cfg)
  if cfg.loss_chunk_len:
    hidden = model.apply({"params": params}, batch["inputs"], batch["positions"],
                         segment_ids=segment_ids, method="hidden")
    head = lambda x: model.apply({"params": params}, x, method="head")  # noqa: E731
    return chunked_cross_entropy_sums(hidden, head, batch["targets"], batch["loss_mask"],
                                      cfg.loss_chunk_len, z_loss)
  logits = model.apply({"params": params}, batch["inputs"], batch["positions"], segment_ids=segment_ids)
  return cross_entropy_sums(logits, batch["targets"], batch["loss_mask"], z_loss)


def gradient_step(state: TrainState, batch: dict, objective, *, tx: optax.GradientTransformation,
                  grad_accum_steps: int = 1, lr_schedule=None, view=None):
  """One optimiser update of `objective(params, micro_batch) -> (loss sum, count, {name: sum})`,
  the sums taken over micro-batches and divided once by the total count (so micro-batching gives
  the one-batch update exactly). Every recipe's step is this with its own objective: the LM's
  counts tokens, DPO's and the reward model's count pairs, PPO's response tokens.

  `view(params, frozen, draw)`, where given (`train.loop.Training.view`), is what the objective is
  applied to (LoRA: the frozen base with the trained adapters attached, its dropout keyed by
  `draw`, one per micro-batch of each step); gradients are taken with respect to `state.params`
  only.

  Returns (state, metrics, count): each summed metric divided by the count, `train/grad_norm` and
  `train/lr`."""
  def micro_grads(micro, index=0):
    def value(params):
      if view is not None:  # a draw of its own for each micro-batch (LoRA's dropout masks)
        params = view(params, state.frozen, state.step * grad_accum_steps + index)
      total, count, sums = objective(params, micro)
      return total, (count, sums)
    (_, (count, sums)), grads = jax.value_and_grad(value, has_aux=True)(state.params)
    return grads, count, sums

  if grad_accum_steps == 1:
    grads, count, sums = micro_grads(batch)
  else:
    # (B, ...) -> (k, B/k, ...): micro-batch i takes rows i, i+k, ... so each one stays spread over
    # the data-parallel devices instead of living on one of them.
    micro = jax.tree.map(
        lambda x: nn.with_logical_constraint(
            x.reshape((-1, grad_accum_steps) + x.shape[1:]).swapaxes(0, 1),
            (None, BATCH) + (LENGTH,) * (x.ndim - 1)),
        batch)

    def accumulate(carry, indexed):
      index, mb = indexed
      return jax.tree.map(jnp.add, carry, micro_grads(mb, index)), None

    shapes = jax.eval_shape(micro_grads, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, count, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))

  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  metrics = {k: v / count for k, v in sums.items()}
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm) & jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))

  def apply(s):
    updates, opt_state = tx.update(grads, s.opt_state, s.params)
    return s.replace(params=optax.apply_updates(s.params, updates), opt_state=opt_state)

  # A cond (not a select over every parameter): the skipped branch costs nothing.
  state = jax.lax.cond(finite, apply, lambda s: s, state)
  state = state.replace(step=state.step + 1,
                        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
  metrics["train/grad_norm"] = grad_norm
  if lr_schedule is not None:
    metrics["train/lr"] = lr_schedule(state.step - 1)
  return state, metrics, count


def train_step(state: TrainState, batch: dict, *, cfg: ModelConfig, tx: optax.GradientTransformation,
               grad_accum_steps: int = 1, z_loss: float = 0.0, lr_schedule=None,
               document_attention: bool = False, view=None):
  def objective(params, micro):
    total, count, nll = _loss_sums(params, cfg, micro, z_loss, document_attention)
    return total, count, {"train/loss": nll}

  state, metrics, count = gradient_step(state, batch, objective, tx=tx, grad_accum_steps=grad_accum_steps,
                                        lr_schedule=lr_schedule, view=view)
  metrics["train/tokens"] = count
  return state, metrics


def eval_step(params, batch: dict, *, cfg: ModelConfig, document_attention: bool = False):
  """(sum of NLL, number of counted tokens) over one batch."""
  _, count, nll = _loss_sums(params, cfg, batch, 0.0, document_attention)
  return nll, count


def make_train_step(cfg: ModelConfig, tx, opt_cfg, lr_schedule, document_attention: bool = False,
                    view=None):
  return functools.partial(train_step, cfg=cfg, tx=tx, grad_accum_steps=int(opt_cfg.grad_accum_steps),
                           z_loss=float(opt_cfg.z_loss), lr_schedule=lr_schedule,
                           document_attention=document_attention, view=view)
