"""The public Python API: `llama_jax.load(path) -> Model`.

`load` recognises a checkpoint by its files: the project's own (a saved model or a training
workdir), a Hugging Face LLaMA directory (`config.json`), or a Meta directory (`params.json`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import checkpoint
from llama_jax.config import ModelConfig
from llama_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Model:
  config: ModelConfig
  params: Any
  tokenizer: Tokenizer | None = None

  def logits(self, tokens) -> np.ndarray:
    """int tokens (B, T) -> float32 logits (B, T, vocab) as numpy."""
    from llama_jax.model import forward
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"tokens must be an int array of shape (batch, length), got {tokens.dtype}{tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
      raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
    return np.asarray(forward(self.config, self.params, jnp.asarray(tokens, jnp.int32)))

  def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 128,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               **kwargs) -> list:
    """Strings in, strings out (continuations); token-id lists in, token-id lists out (prompt then
    continuation). temperature 0 is greedy."""
    from llama_jax import sampling
    return sampling.generate(self, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, seed=seed, **kwargs)

  def save(self, directory: str) -> None:
    checkpoint.save_model(directory, self.config, self.params,
                          self.tokenizer.path if self.tokenizer else None)

  def export_hf(self, directory: str, dtype: str | None = None) -> None:
    from llama_jax.interop import hf
    hf.export_hf(self.config, self.params, directory,
                 tokenizer_path=self.tokenizer.path if self.tokenizer else None, dtype=dtype)


def load(path: str | os.PathLike, dtype: str | None = None, tokenizer: str | None = None,
         mesh=None, rules=None, **config_overrides) -> Model:
  """Loads any checkpoint this project reads. `dtype` sets the compute dtype; `config_overrides`
  change other run-time fields (attention_impl, remat_policy, ...) but not the shape. With a `mesh`
  the parameters are placed sharded over it (`sharding.DEFAULT_RULES` unless `rules`), so a model
  larger than one device loads; an own checkpoint is restored straight into its shards."""
  from llama_jax import sharding
  rules = rules or sharding.DEFAULT_RULES
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path does not exist: {path}")
  if checkpoint.is_own_checkpoint(path):
    place = (lambda cfg: sharding.model_param_shardings(cfg, mesh, rules)) if mesh is not None else None
    config, params, tokenizer_path = checkpoint.load_model_files(path, place)
  elif os.path.isfile(os.path.join(path, "config.json")):
    from llama_jax.interop import hf
    config, params, tokenizer_path = hf.load_hf(path)
  elif os.path.isfile(os.path.join(path, "params.json")):
    from llama_jax.interop import meta
    config, params, tokenizer_path = meta.load_meta(path)
  else:
    raise FileNotFoundError(
        f"{path}: not a checkpoint (no model_config.json, Hugging Face config.json or Meta params.json)")
  if dtype is not None:
    config_overrides["dtype"] = dtype
  if config_overrides:
    config = config.replace(**config_overrides)
  if mesh is not None:
    params = jax.device_put(params, sharding.model_param_shardings(config, mesh, rules))  # no-op if restored sharded
  else:
    params = jax.tree.map(jnp.asarray, params)
  tok = Tokenizer(tokenizer) if tokenizer else (Tokenizer(tokenizer_path) if tokenizer_path else None)
  return Model(config, params, tok)
