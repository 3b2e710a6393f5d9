"""Base training config: the LLaMA paper's optimiser (section 2.2), the tiny model, the bundled corpus.

Every other config imports this one and changes a few fields. Override from the command line with
`--config.optimizer.lr=1e-3`; an unknown key or a wrong type is an error.
"""

import ml_collections

from llama_jax import data, lora
from llama_jax.config import preset, to_config_dict
from llama_jax.sharding import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Model shape and run-time options (llama_jax.config.ModelConfig documents each field).
  config.model = to_config_dict(preset("tiny"))
  # What is trained: "lm" (next-token prediction: pretraining, SFT), or llama_jax.align's "reward"
  # (a reward model), "dpo" or "ppo", each with its own block (configs/reward_tiny.py, ...).
  config.recipe = "lm"

  config.num_steps = 1000  # optimiser steps; 0: one pass over the data's epoch limits (fine-tuning)
  config.batch_size = 32  # global sequences per step, over all devices and hosts
  config.seq_len = 256  # tokens per sequence
  config.seed = 0  # parameter initialisation and data order
  config.log_every = 10  # steps between metrics lines (each one syncs the host with the devices)
  config.eval_every = 0  # steps between evaluations; 0: never
  config.checkpoint_every = 0  # steps between checkpoints; 0: only at the end and on preemption
  config.keep_checkpoints = 3  # how many recent checkpoints to keep
  config.init_from = ""  # a checkpoint llama_jax.load reads (HF, Meta, own) to fine-tune from
  config.peak_flops_per_device = 0.0  # for MFU where the device is not in metrics.PEAK_FLOPS; 0: look up

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = 3e-4  # peak learning rate (LLaMA 7B/13B: 3e-4; 33B/65B: 1.5e-4)
  config.optimizer.warmup_steps = 100  # linear warmup from 0 (the paper: 2000)
  config.optimizer.warmup_ratio = 0.0  # > 0: warmup over this share of num_steps instead
  config.optimizer.min_lr_ratio = 0.1  # cosine decay ends at lr * min_lr_ratio
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.1  # decoupled (AdamW); not applied to RMSNorm weights
  config.optimizer.clip_norm = 1.0  # global gradient norm (0: no clipping)
  config.optimizer.grad_accum_steps = 1  # micro-batches per step (batch_size must divide by it)
  config.optimizer.z_loss = 0.0  # PaLM's auxiliary log(Z)^2 loss weight; 0: off
  config.optimizer.moments_dtype = "float32"  # Adam's moments; "bfloat16" halves the optimizer state

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1  # pure data parallelism (parameters replicated)
  config.mesh.fsdp = -1  # parameters and optimiser state sharded, batch split; -1: all remaining devices
  config.mesh.tensor = 1  # Megatron-style split of heads and the FFN width
  config.mesh.rules = DEFAULT_RULES  # logical axis name -> mesh axes

  # LoRA: rank > 0 trains low-rank adapters of a frozen base (init_from) instead of the model;
  # llama_jax.lora.config documents each field.
  config.lora = lora.default_config()

  config.data = data.default_config()  # sources, tokenizer, packing: llama_jax.data documents it
  config.data.vocab_size = config.model.get_ref("vocab_size")  # a trained tokenizer fills the model
  return config
