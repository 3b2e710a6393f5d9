"""`config.lora`: the adapters' rank, scale, dropout and the projections they adapt (Hu et al. 2021,
"LoRA: Low-Rank Adaptation of Large Language Models"; field names as Hugging Face PEFT's
`LoraConfig`)."""

from __future__ import annotations

import dataclasses

import ml_collections

from llama_jax import model as M

# Hugging Face's module names, which `target_modules` also accepts (and PEFT's files use).
HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj",
            "w3": "up_proj", "w2": "down_proj"}
BASE_QUANTIZATION = ("", "int8", "int4")


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.rank = 0  # > 0: train rank-r adapters of the projections instead of the model; 0: off
  config.alpha = 16.0  # the adapters' output is scaled by alpha / rank
  config.dropout = 0.0  # dropout on the adapters' input
  # The projections adapted, comma-separated, Meta's names or Hugging Face's (q_proj, ...).
  config.target_modules = "wq,wk,wv,wo,w1,w2,w3"
  # "int8" or "int4": the frozen base quantized by round-to-nearest as it loads (QLoRA-style);
  # a base that is a quantized checkpoint already stays as it is.
  config.quantize_base = ""
  return config


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int
  alpha: float = 16.0
  dropout: float = 0.0
  target_modules: tuple[str, ...] = tuple(M.PROJECTIONS)
  quantize_base: str = ""

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank must be positive, got {self.rank}")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"lora.dropout must lie in [0, 1), got {self.dropout}")
    if self.quantize_base not in BASE_QUANTIZATION:
      raise ValueError(f"lora.quantize_base must be '', 'int8' or 'int4', got {self.quantize_base!r}")
    if not self.target_modules:
      raise ValueError("lora.target_modules names no module")
    names = {hf: ours for ours, hf in HF_NAMES.items()}
    targets = []
    for name in self.target_modules:
      name = names.get(name, name)
      if name not in M.PROJECTIONS:
        raise ValueError(f"lora.target_modules: no module {name!r} in the model; the projections are "
                         f"{', '.join(M.PROJECTIONS)} (or {', '.join(HF_NAMES.values())})")
      if name not in targets:
        targets.append(name)
    object.__setattr__(self, "target_modules", tuple(t for t in M.PROJECTIONS if t in targets))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "target_modules": list(self.target_modules)}

  @classmethod
  def from_dict(cls, values) -> "LoraConfig":
    values = dict(values)
    targets = values.get("target_modules", ",".join(M.PROJECTIONS))
    if isinstance(targets, str):
      targets = [t.strip() for t in targets.split(",") if t.strip()]
    values["target_modules"] = tuple(targets)
    return cls(**values)


def from_run_config(config) -> LoraConfig | None:
  """The LoRA settings of a training config, or None where LoRA is off (no block, or rank 0)."""
  block = config.get("lora") if hasattr(config, "get") else None
  if not block or int(block.get("rank", 0)) == 0:
    return None
  return LoraConfig.from_dict(block.to_dict() if hasattr(block, "to_dict") else block)
