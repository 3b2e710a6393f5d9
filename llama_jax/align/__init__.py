"""Alignment: reward models, DPO and RLHF with PPO (and GRPO), trained by the same `train.py` loop
(`config.recipe`: "reward", "dpo", "ppo"; "lm" is `train.loop.LanguageModel`).

  losses    the objectives as pure functions of log-probs, rewards and values (DPO, IPO,
            Bradley-Terry, the KL-shaped reward, GAE, PPO's clipped losses, GRPO's advantages)
  heads     what the recipes read off the backbone: response log-probs, a score, a value
  data      preference pairs and prompts from JSON lines, batched by the data pipeline's pieces
  recipe    the pairs recipe (reward model, DPO) and the frozen models' copies
  reward    the reward-model recipe; `load_reward_model`, scoring text, the Hugging Face export
  dpo       the DPO recipe (frozen reference = the init_from model)
  ppo       the PPO recipe: rollouts by the generation engine, scoring, GAE, clipped updates
  demo      the letters demo's measure: the share of a model's greedy answers in the requested
            form (the task and its data: `data.preference_demo`)
  __main__  `python -m llama_jax.align check|export`
"""

from __future__ import annotations

from llama_jax.sharding import ConfigError

RECIPES = ("lm", "reward", "dpo", "ppo")


def get_recipe(config):
  """The recipe `config.recipe` names, for `train.loop.train_and_evaluate`."""
  name = config.get("recipe", "lm")
  if name == "lm":
    from llama_jax.train.loop import LanguageModel
    return LanguageModel()
  if name == "reward":
    from llama_jax.align.reward import RewardRecipe
    return RewardRecipe()
  if name in ("dpo", "ppo") and name not in config:
    # Their settings have no defaults outside their configs (configs/dpo.py, configs/ppo.py).
    raise ConfigError(f"config.recipe {name!r} needs a config.{name} section: start from configs/{name}.py")
  if name == "dpo":
    from llama_jax.align.dpo import DPO
    return DPO()
  if name == "ppo":
    from llama_jax.align.ppo import PPO
    return PPO()
  raise ConfigError(f"unknown config.recipe {name!r}; known: {', '.join(RECIPES)}")


def load_reward_model(path, mesh=None, rules=None, **config_overrides):
  """A trained reward model (`reward.RewardModel`: `score`, `score_tokens`, `export_hf`)."""
  from llama_jax.align.reward import load_reward_model as load
  return load(path, mesh=mesh, rules=rules, **config_overrides)


__all__ = ["RECIPES", "get_recipe", "load_reward_model"]
