"""PPO of a TinyLlama-1.1B SFT model on one GPU: `configs/ppo.py`'s recipe with the model and
run-time settings of `configs/tinyllama_1b.py`: 64 prompts of up to 256 tokens a rollout batch,
answers of up to 256 tokens.

  python train.py --config configs/ppo_tinyllama_1b.py --workdir runs/ppo_tinyllama \\
      --config.init_from=/path/to/tinyllama-sft --config.ppo.reward_model=runs/rm_tinyllama \\
      --config.data.sources.prompts.path=prompts.jsonl
  python -m llama_jax.bench ppo --config configs/ppo_tinyllama_1b.py   # throughput, random weights
"""

from configs import ppo, tinyllama_1b


def get_config():
  config = ppo.get_config()
  config.model = tinyllama_1b.get_config().model
  config.data.vocab_size = config.model.get_ref("vocab_size")
  config.batch_size = 64
  config.ppo.prompt_len = 256
  config.ppo.max_new_tokens = 256
  return config
