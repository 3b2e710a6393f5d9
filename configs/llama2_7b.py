"""LLaMA-2-7B (Touvron et al. 2023b) on several GPUs of one host: bf16 compute, cuDNN flash
attention, parameters and AdamW state sharded over every device (ZeRO-3 style, `mesh.fsdp=-1`).

6.7B float32 parameters with float32 AdamW are 16 bytes a parameter (108 GB with the gradients):
two 141 GB or four 80 GB GPUs. Activations are rematerialised except the matmuls' outputs and
cuDNN attention's (`dots_and_attention`: the backward pass does not run the attention forward
again), so 4096-token sequences fit beside them. Run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95: on
80 GB cards JAX's default share of a card (75%, 60 GB) is too small, and on two 141 GB cards the
default batch peaked at 105.7 GiB, past that share (105.3 GiB; measured with 0.95). Throughput:
`python -m llama_jax.bench train --config configs/llama2_7b.py` (BENCHMARKS.md): 55.2% MFU on two
H200s at 4 sequences a GPU, 56.9% on four at 6.

Point `config.data.sources` at real shards and `config.data.tokenizer` at LLaMA's tokenizer for a
real run (or `config.init_from` at a checkpoint to fine-tune).
"""

from configs import default
from llama_jax.config import preset, to_config_dict


def get_config():
  config = default.get_config()
  # Unrolled blocks (the parameters keep the scanned layout), measured faster: +4.8% tokens/s on
  # two H200s, +4.1-4.4% on four, for 2-18 GB more a GPU and a first step of 25-35 s instead of
  # 13-15 (BENCHMARKS.md, `unrolled`). At 4 sequences a GPU on four GPUs it peaks at 85.7 GB, past
  # an 80 GB card: keep 2 a GPU there (the default batch). Why faster is not profiled; a guess:
  # XLA schedules a block's FSDP collectives around its neighbours' matmuls only when no loop
  # boundary lies between them.
  config.model = to_config_dict(preset("llama2_7b", dtype="bfloat16", attention_impl="cudnn",
                                       scan_layers=False, remat_policy="dots_and_attention"))
  config.data.vocab_size = config.model.get_ref("vocab_size")
  config.num_steps = 250_000
  config.batch_size = 8  # 4096-token sequences: per GPU, 4 on two GPUs, 2 on four
  config.seq_len = 4096
  config.log_every = 10
  config.checkpoint_every = 1000
  config.optimizer.lr = 3e-4  # LLaMA 2's peak, warmup 2000, cosine to 10%
  config.optimizer.warmup_steps = 2000
  return config
