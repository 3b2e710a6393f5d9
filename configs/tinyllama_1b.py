"""TinyLlama-1.1B (Zhang et al. 2024) on one or more NVIDIA GPUs: bf16 compute, cuDNN flash attention.

Point `config.data.sources` at real shards (and `config.data.tokenizer` at LLaMA's tokenizer.model)
for a real run; the benchmark (`python -m llama_jax.bench train --config configs/tinyllama_1b.py`)
uses synthetic tokens.
"""

from configs import default
from llama_jax.config import preset, to_config_dict


def get_config():
  config = default.get_config()
  # Unrolled layers: 68k tokens/s against 52k scanned on an H100 (BENCHMARKS.md), for 15 s of
  # compilation instead of 10.
  config.model = to_config_dict(preset("tinyllama_1b", dtype="bfloat16", attention_impl="cudnn",
                                       scan_layers=False))
  config.data.vocab_size = config.model.get_ref("vocab_size")
  config.num_steps = 100_000
  config.batch_size = 8
  config.seq_len = 2048
  config.log_every = 50
  config.checkpoint_every = 2000
  config.optimizer.lr = 4e-4  # TinyLlama's peak
  config.optimizer.warmup_steps = 2000
  return config
