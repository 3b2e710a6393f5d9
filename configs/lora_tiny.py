"""`sft_tiny` with LoRA: rank-8 adapters of every projection of the tiny model of configs/tiny.py,
trained on the demo conversations while the base stays frozen (only the adapters are in the
optimiser state and the checkpoints).

  python train.py --config configs/tiny.py --workdir runs/tiny
  python train.py --config configs/lora_tiny.py --workdir runs/tiny_lora
  python generate.py --checkpoint runs/tiny_lora --chat --temperature 0   # the base + adapters
  python -m llama_jax.convert --input runs/tiny_lora --merge_lora --output runs/tiny_lora_merged
  python -m llama_jax.convert --input runs/tiny_lora --to peft --output runs/tiny_lora_peft

QLoRA-style, on a 4-bit base: `--config.lora.quantize_base=int4`, or `--config.init_from=` a
checkpoint written by `python -m llama_jax.quantize`.
"""

from configs import sft_tiny


def get_config():
  config = sft_tiny.get_config()
  config.lora.rank = 8
  config.lora.alpha = 16.0
  config.lora.dropout = 0.05
  config.optimizer.lr = 3e-3  # adapters take a larger learning rate than full fine-tuning
  config.optimizer.weight_decay = 0.0
  return config
