"""The public Python API: `llama_jax.load(path) -> Model`.

`load` reads any checkpoint `llama_jax.convert.open_source` recognises: the project's own (a saved
model, quantized or not, or a training workdir; a LoRA run's workdir gives its base model with the
adapters), a Hugging Face LLaMA directory (`config.json`) or a Meta directory (`params.json`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax import checkpoint, sharding
from llama_jax.config import ModelConfig
from llama_jax.tokenizer import Tokenizer, TokenizerError, load_tokenizer


@dataclasses.dataclass
class Model:
  config: ModelConfig
  params: Any
  tokenizer: Tokenizer | None = None
  mesh: Mesh | None = None  # where the parameters lie, if sharded; generation runs there too
  rules: tuple = sharding.DEFAULT_RULES  # logical axis -> mesh axes, for the parameters and the engine
  # How quantized weights were made (quantization.json's method, bits, calibration): `save` writes
  # it again beside them.
  quantization: dict | None = None
  # A Hugging Face source's special ids and sampling defaults: what `export_hf` writes where the
  # model has no tokenizer to give them (not kept by `save`).
  generation: dict | None = None

  def logits(self, tokens) -> np.ndarray:
    """int tokens (B, T) -> float32 logits (B, T, vocab) as numpy."""
    from llama_jax.model import forward
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"tokens must be an int array of shape (batch, length), got {tokens.dtype}{tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
      raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
    if tokens.shape[1] > self.config.max_seq_len:  # positions the model never trained on
      raise ValueError(f"tokens has rows of {tokens.shape[1]} tokens but the model's context is "
                       f"{self.config.max_seq_len} tokens")
    return np.asarray(forward(self.config, self.params, jnp.asarray(tokens, jnp.int32)))

  def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 128,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               **kwargs) -> list:
    """Strings in, strings out (continuations); token-id lists in, token-id lists out (prompt then
    continuation). temperature 0 is greedy; temperature, top_p and top_k may be one value per
    prompt."""
    from llama_jax.generate import generate
    return generate(self, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, top_k=top_k, seed=seed, **kwargs)

  def save(self, directory: str, overwrite: bool = False) -> None:
    """Our format, with the tokenizer's files; a previous model's there are not kept. A directory
    holding anything else (another format's model, other files) is refused unless `overwrite`; a
    training workdir always."""
    from llama_jax.convert import hf
    from llama_jax.convert.output import check_output
    check_output(os.fspath(directory), "orbax", overwrite, command_line=False)
    ids = hf.generation_file(self.generation) if self.tokenizer is None else {}  # (as convert's)
    checkpoint.save_model(directory, self.config, self.params, self.tokenizer, quantization=self.quantization,
                          files=ids, replace_tokenizer=True)

  def export_hf(self, directory: str, dtype: str | None = None, overwrite: bool = False) -> None:
    """config.json, generation_config.json, safetensors and the tokenizer's files, which
    transformers' AutoModelForCausalLM, GenerationConfig and AutoTokenizer load. A directory holding
    anything else is refused unless `overwrite`, as by `save`."""
    from llama_jax.convert import hf
    from llama_jax.convert.output import check_output
    check_output(os.fspath(directory), "hf", overwrite, command_line=False)
    hf.export_hf(self.config, self.params, directory,
                 tokenizer_path=self.tokenizer.path if self.tokenizer else None, dtype=dtype,
                 generation=self.generation)


def load(path: str | os.PathLike, dtype: str | None = None, tokenizer: str | None = None,
         mesh: Mesh | None = None, rules=None, backbone: bool = False, **config_overrides) -> Model:
  """Loads any checkpoint this project reads, with its tokenizer (`tokenizer`: a tokenizer.json, a
  SentencePiece .model or a folder holding one, instead of the checkpoint's own). `dtype` sets the compute dtype; `config_overrides`
  change other run-time fields (attention_impl, remat_policy, ...) but not the shape. With a `mesh`
  the parameters go straight into their shards over it (by `rules`, default
  `sharding.DEFAULT_RULES`), so a model larger than one device loads and none holds all of it.
  A reward model (a `score` head, no output head) is an error: `llama_jax.load_reward_model` reads
  it. `backbone`: the parameters without the output head, of a language model or a reward model
  alike (what a reward run starts from, `align.reward`)."""
  from llama_jax.convert import source
  rules = sharding.as_rules(rules or sharding.DEFAULT_RULES)
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path does not exist: {path}")
  src = source.open_source(path)
  if not backbone and src.params_dir and "score" in (checkpoint.saved_keys(src.params_dir) or ()):
    raise ValueError(f"{path}: a reward model (a 'score' head, no language-model head to generate "
                     "with): load it with llama_jax.load_reward_model to score with it")
  config = src.config
  tokenizer_path = tokenizer or src.tokenizer_path
  tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
  if tok is not None and tok.vocab_size > config.vocab_size:
    raise TokenizerError(f"{tokenizer_path}: the tokenizer has {tok.vocab_size} tokens but the model's "
                         f"embedding has {config.vocab_size} rows; pass the tokenizer the model was trained with")
  if dtype is not None:
    config_overrides["dtype"] = dtype
  if mesh is not None and src.kind != "lora" and not src.quantization:
    # (a LoRA run's base is checked by its own load; quantized weights replicate what does not split)
    sharding.check_params_divisible(src.config, mesh, rules)
  quantization = None
  if src.kind == "lora":
    # A LoRA run: its base model with the adapters merged in (attached, over a quantized base).
    from llama_jax.lora import files
    base = files.base_path(path)
    loaded = load(base, mesh=mesh, rules=rules, backbone=backbone)
    config, params, _ = files.adapt(path, loaded.config, loaded.params, base, mesh=mesh, rules=rules)
    quantization = loaded.quantization
  elif src.kind == "orbax":
    # Restored by Orbax straight into the target shardings (or the first device); quantized
    # weights stay quantized.
    shardings = sharding.param_shardings(src.config, mesh, rules) if mesh is not None else None
    params = checkpoint.load_params(src.params_dir, src.config, shardings, src.quantization, backbone)
    quantization = {k: v for k, v in (src.quantization or {}).items() if k != "weights"} or None
  else:
    config, params = source.load(src, "float32")  # numpy on the host, one copy
    if backbone:
      params.pop("output", None)
    if mesh is not None:
      shardings = sharding.param_shardings(config, mesh, rules)
      params = jax.device_put(params, {k: shardings[k] for k in params})
    else:
      params = jax.tree.map(jnp.asarray, params)
  if config_overrides:
    config = config.replace(**config_overrides)
  return Model(config, params, tok, mesh, rules, quantization, src.generation)
