"""Vicuna-style delta weights: tuned = base + delta, parameter by parameter.

As FastChat's `apply_delta.py` (Chiang et al. 2023, Vicuna): a delta may have a larger vocabulary
than its base (tokens added in fine-tuning, e.g. a pad token); it keeps those extra embedding and
output rows as they are and adds the base into the rows they share. Making a delta is the inverse,
tuned - base, with the tuned model's extra rows kept whole, so applying it gives the tuned weights.
The base is loaded whole (in float32 by default); the other model streams into it tensor by
tensor, so memory stays near one copy of the model.
"""

from __future__ import annotations

import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.convert import CheckpointError, layout
from llama_jax.convert.source import Source, load

_SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "tie_embeddings")


def check_compatible(base: ModelConfig, other: ModelConfig, base_path: str, other_path: str) -> None:
  for name in _SHAPE_FIELDS:
    a, b = getattr(base, name), getattr(other, name)
    if a != b:
      raise CheckpointError(f"{other_path}: {name} is {b} but the base {base_path} has {a}")
  if other.vocab_size < base.vocab_size:
    raise CheckpointError(f"{other_path}: vocabulary of {other.vocab_size} is smaller than the base's "
                          f"({base_path}: {base.vocab_size})")


def grow_vocab(params: dict, vocab_size: int) -> None:
  """Extends the embedding rows (and output columns) with zeros up to `vocab_size`, in place."""
  for path, axis in layout.VOCAB_PATHS.items():
    if path[0] not in params:
      continue  # a tied head has no output matrix
    old = layout.get(params, path)
    if old.shape[axis] == vocab_size:
      continue
    shape = list(old.shape)
    shape[axis] = vocab_size
    new = np.zeros(shape, old.dtype)
    new[tuple(slice(0, n) for n in old.shape)] = old
    layout.put(params, path, new)


def _combine(base: Source, other: Source, op: str, dtype: str) -> tuple[ModelConfig, dict]:
  check_compatible(base.config, other.config, base.path, other.path)
  _, params = load(base, dtype)
  grow_vocab(params, other.config.vocab_size)
  cfg = other.config.replace(param_dtype=dtype)
  layout.Assembler(cfg, other.path, tree=params, op=op).add_all(other.stream()).finish()
  return cfg, params


def apply_delta(base: Source, delta: Source, dtype: str = "float32") -> tuple[ModelConfig, dict]:
  """(config, params) of base + delta; the config (norm_eps, rope_theta, vocabulary) is the delta's."""
  return _combine(base, delta, "add", dtype)


def make_delta(tuned: Source, base: Source, dtype: str = "float32") -> tuple[ModelConfig, dict]:
  """(config, params) of tuned - base, with the tuned model's config."""
  return _combine(base, tuned, "rsub", dtype)
