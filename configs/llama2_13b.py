"""LLaMA-2-13B on two 141 GB GPUs (H200) or four 80 GB ones: the 7B recipe of
`configs/llama2_7b.py` with Adam's moments in bfloat16.

13.0B float32 parameters and gradients are 104 GB; float32 AdamW state would add 104 GB more,
past two H200s (282 GB) once activations are counted. `optimizer.moments_dtype = "bfloat16"`
stores the two moments in 2 bytes each (52 GB), updated in float32; BENCHMARKS.md compares its
loss curve with float32 moments on a small model. On four 80 GB cards two sequences a GPU fit in
95% of a card (XLA_PYTHON_CLIENT_MEM_FRACTION=0.95; JAX takes 75% by default) with `dots_no_batch`;
the 7B's `dots_and_attention` (which also keeps attention's outputs) does not (BENCHMARKS.md).
"""

from configs import llama2_7b
from llama_jax.config import preset, to_config_dict


def get_config():
  config = llama2_7b.get_config()
  config.model = to_config_dict(preset("llama2_13b", dtype="bfloat16", attention_impl="cudnn",
                                       scan_layers=True, remat_policy="dots_no_batch"))
  config.data.vocab_size = config.model.get_ref("vocab_size")
  config.optimizer.moments_dtype = "bfloat16"
  return config
