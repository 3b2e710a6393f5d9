"""What the recipes read off the LLaMA backbone: the log-probabilities of response tokens (the LM
head), one scalar per sequence (a reward model's `score` head, on the last token), one scalar per
token (PPO's `value_head`).

The backbone is `model.Transformer(cfg).apply(..., method="hidden")`, the final normed hidden
states (B, T, D). A recipe's parameter tree is the model's with its head beside it:
  reward model  {tok_embeddings, layers, norm, score (D,)}: no `output`, as Hugging Face's
                LlamaForSequenceClassification has no lm_head
  PPO policy    the model's tree and value_head {kernel (D,), bias ()}: the policy and the critic
                share the backbone (Ziegler et al. 2019; TRL's value-head model), and the tree still
                loads as a plain model (`llama_jax.load` restores the model's part)
Heads start at zero: the first scores and values are 0, the backbone's gradients start once the
head has moved.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.model import EMBED, MODEL_KEYS, Transformer, init_params
from llama_jax.train.loss import chunked_cross_entropy_sums, cross_entropy_sums

Array = jax.Array


def _model(cfg: ModelConfig, params) -> tuple[Transformer, dict]:
  """The Transformer to apply to `params` and the model's part of them. A tree without `output`
  (a reward model's) is applied as a tied model, which reads no `output`: the blocks and the
  final norm are the same."""
  if "output" not in params and not cfg.tie_embeddings:
    cfg = cfg.replace(tie_embeddings=True)
  return Transformer(cfg), {k: params[k] for k in MODEL_KEYS if k in params}


def hidden_states(cfg: ModelConfig, params, tokens: Array) -> Array:
  """(B, T) tokens at positions 0..T-1 -> the final normed hidden states (B, T, D)."""
  model, weights = _model(cfg, params)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return model.apply({"params": weights}, tokens, positions, method="hidden")


def lm_logits(cfg: ModelConfig, params, hidden: Array) -> Array:
  """(B, T, D) hidden states -> float32 logits (B, T, V)."""
  model, weights = _model(cfg, params)
  return model.apply({"params": weights}, hidden, method="head")


def sequence_logps(cfg: ModelConfig, params, tokens: Array, mask: Array) -> Array:
  """(B,) log-likelihood of each row's masked tokens: Σ_t mask[t] log p(tokens[t] | tokens[<t])
  over t >= 1. With `model.loss_chunk_len`, the float32 logits are made that many positions at a
  time (the LM loss's own chunking, per row)."""
  hidden = hidden_states(cfg, params, tokens[:, :-1])  # (B, T, D) predicts tokens[:, 1:]
  head = functools.partial(lm_logits, cfg, params)
  chunk = cfg.loss_chunk_len

  def row_nll(h, targets, weights):  # one row: (T, D), (T,), (T,)
    if chunk:
      sums = chunked_cross_entropy_sums(h[None], head, targets[None], weights[None], chunk)
    else:
      sums = cross_entropy_sums(head(h[None]), targets[None], weights[None])
    return sums[2]

  return -jax.vmap(row_nll)(hidden, tokens[:, 1:], mask[:, 1:].astype(jnp.float32))


def last_index(mask: Array) -> Array:
  """(B,) the position of each row's last masked token (a response's end marker)."""
  return jnp.max(jnp.where(mask > 0, jnp.arange(mask.shape[1]), 0), axis=1)


def gather_positions(x: Array, index: Array) -> Array:
  """x (B, T, ...) at positions index (B, N) -> (B, N, ...)."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def rewards(cfg: ModelConfig, params, tokens: Array, last: Array) -> Array:
  """(B,) a reward model's score: its head on the hidden state of each row's token at `last`."""
  hidden = hidden_states(cfg, params, tokens)
  at_last = gather_positions(hidden, last[:, None])[:, 0]  # (B, D)
  return jnp.einsum("BD,D->B", at_last.astype(jnp.float32), params["score"].astype(jnp.float32))


def response_outputs(cfg: ModelConfig, params, tokens: Array, index: Array, targets: Array,
                     temperature: float = 1.0):
  """The policy (and critic) on the response positions: (log-probs, entropies, values), each
  (B, N), where index (B, N) are the positions whose next tokens are `targets` (B, N). Only those
  N positions go through the output head. Values are None without a value head.

  Log-probs and entropies are of the distribution at `temperature` (softmax(logits / T)): the one
  rollouts sampled at that temperature were drawn from."""
  hidden = gather_positions(hidden_states(cfg, params, tokens), index)  # (B, N, D)
  logits = lm_logits(cfg, params, hidden)  # (B, N, V) float32
  if temperature != 1.0:
    logits = logits / temperature
  log_z = jax.nn.logsumexp(logits, axis=-1)
  logps = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z
  entropy = log_z - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
  values = None
  if "value_head" in params:
    head = params["value_head"]
    values = jnp.einsum("BND,D->BN", hidden.astype(jnp.float32), head["kernel"].astype(jnp.float32))
    values = values + head["bias"].astype(jnp.float32)
  return logps, entropy, values


def _zeros(shape, axes, dtype):
  return nn.LogicallyPartitioned(jnp.zeros(shape, dtype), names=axes)


def reward_params(cfg: ModelConfig, rng: Array):
  """Boxed parameters of a reward model (a random backbone, a zero score head)."""
  params = dict(init_params(cfg, rng))
  params.pop("output", None)
  params["score"] = _zeros((cfg.dim,), (EMBED,), cfg.param_dtype)
  return params


def policy_params(cfg: ModelConfig, rng: Array):
  """Boxed parameters of a PPO policy: the model and a zero value head."""
  params = dict(init_params(cfg, rng))
  params["value_head"] = {"kernel": _zeros((cfg.dim,), (EMBED,), cfg.param_dtype),
                          "bias": _zeros((), (), cfg.param_dtype)}
  return params


def model_part(params) -> dict:
  """The model's own parameters of a tree with heads (what generation and `llama_jax.load` see)."""
  return {k: params[k] for k in MODEL_KEYS if k in params}
