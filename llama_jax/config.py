"""The model's shape: one frozen dataclass, the named presets, and the parameter count.

Presets follow the LLaMA paper (Touvron et al. 2023, table 2), LLaMA 2 (Touvron et al. 2023b) and
TinyLlama (Zhang et al. 2024). The feed-forward width follows Meta's `llama/model.py` rule.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_and_attention", "save_matmuls")
ATTENTION_IMPLS = ("xla", "cudnn")
DECODE_ATTENTION_IMPLS = ("xla", "pallas")
DECODE_KERNELS = ("auto", "xla", "pallas")
DTYPES = ("float32", "bfloat16", "float16")
# Rotary frequencies: "none" (theta^(-2i/H)); "linear" (each divided by rope_scaling_factor:
# positions stretched, Chen et al. 2023); "llama3" (Llama 3.1's: wavelengths longer than
# rope_original_max_seq_len / rope_low_freq_factor divided by the factor, those shorter than
# .../ rope_high_freq_factor kept, a smooth blend between). transformers' rope_type names.
ROPE_SCALINGS = ("none", "linear", "llama3")
# Fields that are gone, with why: model_config.json files and run configs written while they were
# fields still load. Each changed only how the model is computed, never what its weights mean.
RETIRED_FIELDS = {
    "norm_impl": "the Pallas RMSNorm kernels for training, removed: no faster than XLA's (BENCHMARKS.md)",
    "swiglu_impl": "the Pallas SwiGLU kernel for training, removed: no faster than XLA's (BENCHMARKS.md)",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  dim: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int | None = None  # None: as many as n_heads (no grouping)
  vocab_size: int = 32000
  multiple_of: int = 256  # the SwiGLU width is rounded up to a multiple of this
  ffn_dim_multiplier: float | None = None  # LLaMA-2 70B: 1.3
  ffn_hidden_dim: int | None = None  # explicit width (Hugging Face's intermediate_size); None: Meta's rule
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: str = "none"  # one of ROPE_SCALINGS, with the four fields below
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_seq_len: int = 8192  # llama3 only: the context the model was pretrained at
  max_seq_len: int = 2048
  dtype: str = "float32"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of the parameters
  tie_embeddings: bool = False  # output head reuses tok_embeddings
  attention_impl: str = "xla"  # "xla" everywhere, "cudnn" (flash attention) on NVIDIA GPUs
  # One query a row over the KV cache, in `model.Block` (the blocks decode_kernels leaves to XLA):
  # "xla" reads the whole cache and masks; "pallas" reads each row's filled positions only
  # (`kernels.decode_attention`; the server's engine picks it on a GPU)
  decode_attention: str = "xla"
  # A decode step's blocks: "pallas" runs each as five fused kernels (`kernels.decode_block`) where
  # its weights and shapes allow, and a step of more rows as XLA's GEMMs around the fused attention
  # kernel (`decode_block.batch_block`); "xla" as `model.Block`; "auto" is pallas on one GPU, else xla.
  decode_kernels: str = "auto"
  remat_policy: str = "none"  # what a block keeps for the backward pass; see model.REMAT
  scan_layers: bool = True  # lax.scan over the blocks: compile time independent of depth
  loss_chunk_len: int = 0  # > 0: the training loss makes logits this many positions at a time; 0: all

  def __post_init__(self):
    if self.n_kv_heads is None:
      object.__setattr__(self, "n_kv_heads", self.n_heads)
    self.validate()

  def validate(self):
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.dim % self.n_heads:
      raise ValueError(f"model.n_heads ({self.n_heads}) does not divide model.dim ({self.dim})")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"model.n_kv_heads ({self.n_kv_heads}) does not divide model.n_heads ({self.n_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head dimension dim/n_heads = {self.head_dim} must be even for rotary embeddings")
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ValueError(f"model.rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
    if self.rope_scaling != "none" and not self.rope_scaling_factor > 0:
      raise ValueError(f"model.rope_scaling_factor must be > 0, got {self.rope_scaling_factor}")
    if self.rope_scaling == "llama3" and not (
        0 < self.rope_low_freq_factor < self.rope_high_freq_factor and self.rope_original_max_seq_len > 0):
      raise ValueError("model.rope_scaling='llama3' needs 0 < rope_low_freq_factor < rope_high_freq_factor "
                       f"and rope_original_max_seq_len > 0, got {self.rope_low_freq_factor}, "
                       f"{self.rope_high_freq_factor}, {self.rope_original_max_seq_len}")
    if self.dtype not in DTYPES or self.param_dtype not in DTYPES:
      raise ValueError(f"model.dtype and model.param_dtype must be one of {DTYPES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
    if self.decode_attention not in DECODE_ATTENTION_IMPLS:
      raise ValueError(f"model.decode_attention must be one of {DECODE_ATTENTION_IMPLS}, "
                       f"got {self.decode_attention!r}")
    if self.decode_kernels not in DECODE_KERNELS:
      raise ValueError(f"model.decode_kernels must be one of {DECODE_KERNELS}, got {self.decode_kernels!r}")
    if self.loss_chunk_len < 0:
      raise ValueError(f"model.loss_chunk_len must be >= 0, got {self.loss_chunk_len}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def hidden_dim(self) -> int:
    """SwiGLU width: Meta's `FeedForward.__init__` rule unless given explicitly."""
    if self.ffn_hidden_dim:
      return int(self.ffn_hidden_dim)
    hidden = int(2 * (4 * self.dim) / 3)
    if self.ffn_dim_multiplier is not None:
      hidden = int(self.ffn_dim_multiplier * hidden)
    return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
    """Builds the config from a mapping (an ml_collections block, a JSON file); unknown keys are
    errors, but for RETIRED_FIELDS, which are dropped with a warning."""
    values = dict(values)
    retired = sorted(set(values) & set(RETIRED_FIELDS))
    for name in retired:
      logging.getLogger("llama_jax").warning("model.%s is no longer a field (%s): ignored", name,
                                             RETIRED_FIELDS[name])
      del values[name]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
    return cls(**values)


def num_params(config: ModelConfig) -> int:
  """Parameters of a model of this shape, counted from the formula (no arrays are made)."""
  d, h, v = config.dim, config.head_dim, config.vocab_size
  attention = d * config.n_heads * h * 2 + d * config.n_kv_heads * h * 2  # wq, wo; wk, wv
  feed_forward = 3 * d * config.hidden_dim
  block = attention + feed_forward + 2 * d  # two RMSNorm weights
  head = 0 if config.tie_embeddings else d * v
  return v * d + config.n_layers * block + d + head


_LLAMA1 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-6, max_seq_len=2048)
_LLAMA2 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-5, max_seq_len=4096)

# Named shapes. Data, not code paths: `ModelConfig(**PRESETS[name])`.
PRESETS: dict[str, dict[str, Any]] = {
    # The CPU demo and tests: small enough to train for a few hundred steps in minutes on 2 cores.
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=64,
                 norm_eps=1e-5, max_seq_len=256),
    "tinyllama_1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000,
                         multiple_of=256, norm_eps=1e-5, max_seq_len=2048),
    "llama_7b": dict(dim=4096, n_layers=32, n_heads=32, **_LLAMA1),
    "llama_13b": dict(dim=5120, n_layers=40, n_heads=40, **_LLAMA1),
    "llama_33b": dict(dim=6656, n_layers=60, n_heads=52, **_LLAMA1),
    "llama_65b": dict(dim=8192, n_layers=80, n_heads=64, **_LLAMA1),
    "llama2_7b": dict(dim=4096, n_layers=32, n_heads=32, **_LLAMA2),
    "llama2_13b": dict(dim=5120, n_layers=40, n_heads=40, **_LLAMA2),
    "llama2_70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, **{
        **_LLAMA2, "multiple_of": 4096}, ffn_dim_multiplier=1.3),
}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})


def to_config_dict(cfg: ModelConfig):
  """The `config.model` block of a training config, with every field typed so that
  `--config.model.x=...` overrides are checked (None-valued fields become typed placeholders)."""
  from ml_collections import config_dict
  block = config_dict.ConfigDict()
  types = {"ffn_dim_multiplier": float, "ffn_hidden_dim": int, "n_kv_heads": int}
  for key, value in cfg.to_dict().items():
    setattr(block, key, config_dict.placeholder(types[key]) if value is None else value)
  return block
