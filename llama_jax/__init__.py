"""llama_jax: LLaMA-family language models in JAX/Flax: pretraining, generation, conversion, evaluation."""

from llama_jax.align import load_reward_model
from llama_jax.api import Model, load
from llama_jax.config import PRESETS, ModelConfig, num_params, preset

__all__ = ["Model", "ModelConfig", "PRESETS", "load", "load_reward_model", "num_params", "preset"]
