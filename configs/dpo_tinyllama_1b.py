"""DPO of a TinyLlama-1.1B SFT model on one GPU: `configs/dpo.py`'s recipe with the model and
run-time settings of `configs/tinyllama_1b.py` (bf16, cuDNN attention, unrolled layers), 8 pairs
of 1024 tokens a step.

  python train.py --config configs/dpo_tinyllama_1b.py --workdir runs/dpo_tinyllama \\
      --config.init_from=/path/to/tinyllama-sft --config.data.sources.pairs.path=prefs.jsonl
  python -m llama_jax.bench dpo --config configs/dpo_tinyllama_1b.py   # throughput, random weights
"""

from configs import dpo, tinyllama_1b


def get_config():
  config = dpo.get_config()
  config.model = tinyllama_1b.get_config().model
  config.data.vocab_size = config.model.get_ref("vocab_size")
  config.batch_size = 8
  config.seq_len = 1024
  return config
