"""The `sft` preset: supervised chat fine-tuning as Vicuna did it (FastChat's README and
`scripts/train_vicuna_*.sh`: learning rate 2e-5, 3 epochs, warmup ratio 0.03, cosine decay, weight
decay 0, global batch 128, max length 2048, the HF Trainer's AdamW betas), with the loss on the
assistant's answers only (`llama_jax.data.sft`).

  python train.py --config configs/sft.py --workdir runs/vicuna_7b \\
      --config.init_from=/path/to/llama-7b --config.data.sources.chat.path=sharegpt.jsonl

`init_from` is any checkpoint `llama_jax.load` reads; `config.model` must have its shape (LLaMA-7B
here). The tokenizer is the checkpoint's own tokenizer.model (left empty here on purpose).
"""

import ml_collections

from configs import default
from llama_jax.config import preset, to_config_dict
from llama_jax.data.config import source


def get_config():
  config = default.get_config()
  config.model = to_config_dict(preset("llama_7b"))
  config.data.vocab_size = config.model.get_ref("vocab_size")
  config.init_from = ""  # required in practice: the base model to fine-tune
  config.num_steps = 0  # as many steps as 3 epochs of the conversations give (data.count_batches)
  config.batch_size = 128
  config.seq_len = 2048
  config.log_every = 10
  config.checkpoint_every = 500

  config.optimizer.lr = 2e-5
  config.optimizer.warmup_ratio = 0.03
  config.optimizer.min_lr_ratio = 0.0  # cosine to 0, as the HF Trainer's "cosine" schedule
  config.optimizer.weight_decay = 0.0
  config.optimizer.b2 = 0.999  # the HF Trainer's AdamW default (LLaMA pretraining used 0.95)

  # ShareGPT conversations, rendered with the Vicuna v1.1 template, 3 epochs; set the path.
  config.data.sources = ml_collections.ConfigDict(dict(
      chat=source("", 1.0, epochs=3, format="sharegpt", template="vicuna_v1.1")))
  config.data.holdout_every = 0  # Vicuna trained on all of it; set data.eval_sources to evaluate
  config.data.document_attention = True  # packed conversations do not attend to each other
  return config
