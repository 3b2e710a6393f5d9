"""Adapters out in Hugging Face PEFT's layout: adapter_config.json + adapter_model.safetensors,
which `peft.PeftModel.from_pretrained(LlamaForCausalLM, DIR)` loads.

PEFT's `LoraLayer` keeps lora_A (r, in) and lora_B (out, r) per `nn.Linear`, with the output
x A^T B^T * lora_alpha / r; ours are a (in..., r) and b (r, out...) per stacked layer, the same
product transposed, so each is a reshape and a transpose. Key names are PEFT's save names
(`peft.utils.save_and_load.get_peft_model_state_dict`: the adapter name dropped), for example
base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from llama_jax.lora.config import HF_NAMES, LoraConfig

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_HF_MODULE = {"attention": "self_attn", "feed_forward": "mlp"}


def peft_tensors(adapters: Any) -> dict[str, np.ndarray]:
  """PEFT's name -> (r, in) or (out, r) float32 array, for every adapted projection and layer."""
  out = {}
  for module, names in adapters["layers"]["block"].items():
    for name, ab in names.items():
      a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
      for layer in range(a.shape[0]):
        prefix = f"base_model.model.model.layers.{layer}.{_HF_MODULE[module]}.{HF_NAMES[name]}"
        r = a.shape[-1]
        out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[layer].reshape(-1, r).T)
        out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[layer].reshape(r, -1).T)
  return out


def peft_config(lora: LoraConfig, base_model: str = "") -> dict:
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model or None,
      "r": lora.rank,
      "lora_alpha": lora.alpha,
      "lora_dropout": lora.dropout,
      "target_modules": [HF_NAMES[t] for t in lora.target_modules],
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
  }


def export_peft(adapters: Any, lora: LoraConfig, directory: str, base_model: str = "") -> None:
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  save_file(peft_tensors(adapters), os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(directory, CONFIG), "w") as f:
    json.dump(peft_config(lora, base_model), f, indent=2)
