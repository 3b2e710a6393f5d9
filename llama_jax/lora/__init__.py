"""LoRA (Hu et al. 2021): low-rank adapters trained beside a frozen base model, merged into it or
exported for Hugging Face PEFT. `config.lora` turns it on in any training config.

  config       `config.lora` (rank, alpha, dropout, target modules, quantize_base) and `LoraConfig`
  adapters     the adapters' own parameter tree: initialisation, attaching to the model's
               parameters (`projection.LoraWeight`, applied by `model._project`), merging, the
               base model's fingerprint
  training     the training loop's side: adapters in the optimiser, the base frozen (`TrainState.frozen`)
  files        a LoRA run's workdir (lora.json, adapters as its checkpoints), loading onto a base
  peft_format  PEFT's adapter_config.json + adapter_model.safetensors

`python -m llama_jax.convert --input RUN --merge_lora --output DST` folds a run's adapters into its
base; `--to peft` writes them in PEFT's layout; `llama_jax.load(RUN)` gives the adapted model.
"""

from llama_jax.lora.config import LoraConfig, default_config

__all__ = ["LoraConfig", "default_config"]
