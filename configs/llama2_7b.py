"""LLaMA-2-7B (Touvron et al. 2023b) on several GPUs of one host: bf16 compute, cuDNN flash
attention, parameters and AdamW state sharded over every device (ZeRO-3 style, `mesh.fsdp=-1`).

6.7B float32 parameters with float32 AdamW are 16 bytes a parameter (108 GB with the gradients):
two 141 GB or four 80 GB GPUs. Activations are rematerialised except the matmuls' outputs and
cuDNN attention's (`dots_and_attention`: the backward pass does not run the attention forward
again), so 4096-token sequences fit beside them. On 80 GB cards JAX's default share of a card
(75%, 60 GB) is too small: run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95. Throughput:
`python -m llama_jax.bench train --config configs/llama2_7b.py` (BENCHMARKS.md).

Point `config.data.sources` at real shards and `config.data.tokenizer` at LLaMA's tokenizer for a
real run (or `config.init_from` at a checkpoint to fine-tune).
"""

from configs import default
from llama_jax.config import preset, to_config_dict


def get_config():
  config = default.get_config()
  # Scanned layers: 32 blocks compile once (unrolled, compilation takes minutes at this size).
  config.model = to_config_dict(preset("llama2_7b", dtype="bfloat16", attention_impl="cudnn",
                                       scan_layers=True, remat_policy="dots_and_attention"))
  config.data.vocab_size = config.model.get_ref("vocab_size")
  config.num_steps = 250_000
  config.batch_size = 8  # 4096-token sequences: per GPU, 4 on two GPUs, 2 on four
  config.seq_len = 4096
  config.log_every = 10
  config.checkpoint_every = 1000
  config.optimizer.lr = 3e-4  # LLaMA 2's peak, warmup 2000, cosine to 10%
  config.optimizer.warmup_steps = 2000
  return config
