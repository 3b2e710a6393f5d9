"""Direct preference optimisation (Rafailov et al. 2023): the recipe "dpo".

The policy starts from `init_from` and the reference is that same model, frozen: a compute-dtype
copy of its parameters, never in the optimiser state (with `config.lora`, the run's frozen base,
`state.frozen`: the policy is that base with the adapters, the reference the base alone). Each step runs the policy (forward and
backward) and the reference (forward only) over the batch's chosen and rejected sequences,
interleaved into one (2B, T) batch, sums each sequence's log-probabilities over its response tokens
and takes `losses.dpo_loss` (`dpo.loss`: "sigmoid", or IPO's "ipo") with `dpo.beta`. With
`dpo.nll_coef` > 0 the chosen answers' negative log-likelihood per token is added with that weight
(Llama 3, Dubey et al. 2024, §4.1.4: 0.2; TRL's `rpo_alpha`), which keeps the chosen answers likely
while the rejected ones are pushed down.

Metrics (means over pairs): dpo/loss, dpo/accuracy (the chosen reward above the rejected),
dpo/margin, dpo/rewards_chosen, dpo/rewards_rejected (the implicit rewards β log π/π_ref), dpo/nll
(the chosen answers' negative log-likelihood per token), and the same on held-out pairs under eval/.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.align import recipe
from llama_jax.align.heads import sequence_logps
from llama_jax.align.losses import DPO_LOSSES, dpo_loss
from llama_jax.config import ModelConfig
from llama_jax.lora.training import settings as lora_settings
from llama_jax.sharding import ConfigError, as_rules
from llama_jax.train import metrics as metrics_lib


class DPO(recipe.PairsRecipe):
  metric = "dpo/loss"

  def frozen(self, config, model_cfg: ModelConfig, mesh, run):
    recipe.require(config, "init_from", "DPO's reference is the model it starts from")
    if config.dpo.loss not in DPO_LOSSES:
      raise ConfigError(f"dpo.loss must be one of {DPO_LOSSES}, got {config.dpo.loss!r}")
    if not config.dpo.beta > 0:
      raise ConfigError(f"dpo.beta must be positive, got {config.dpo.beta}")
    if run.adapters is not None:  # LoRA: the base is frozen already, and is the reference
      return None, None
    # Read here whether or not the run resumes (the policy then comes from the workdir); a fresh
    # run reads init_from once more for the policy, so no float32 copy outlives the start.
    start = recipe.load_frozen_model(config.init_from, model_cfg, mesh, as_rules(config.mesh.rules),
                                     "init_from")
    shardings = run.state_sharding.params
    return recipe.frozen_copy(model_cfg, start.params, shardings), shardings

  def objective(self, config, model_cfg: ModelConfig, params, batch: dict, reference):
    tokens, mask, valid = recipe.pair_rows(batch)
    policy = sequence_logps(model_cfg, params, tokens, mask).reshape(-1, 2)
    ref = jax.lax.stop_gradient(sequence_logps(model_cfg, reference, tokens, mask)).reshape(-1, 2)
    loss, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1],
                                      float(config.dpo.beta), config.dpo.loss)
    chosen_tokens = jnp.maximum(jnp.sum(mask.reshape(-1, 2, mask.shape[1])[:, 0, 1:], axis=1), 1.0)
    nll = -policy[:, 0] / chosen_tokens
    sums = {"dpo/loss": loss, "dpo/accuracy": (chosen > rejected).astype(jnp.float32),
            "dpo/margin": chosen - rejected, "dpo/rewards_chosen": chosen, "dpo/rewards_rejected": rejected,
            "dpo/nll": nll}
    sums = {k: jnp.sum(v * valid) for k, v in sums.items()}
    nll_coef = float(config.dpo.get("nll_coef", 0.0))
    total = sums["dpo/loss"] + nll_coef * sums["dpo/nll"] if nll_coef else sums["dpo/loss"]
    return total, jnp.sum(valid), sums

  def throughput(self, config, model_cfg: ModelConfig) -> tuple[int, float]:
    """2B sequences of T tokens; the policy's forward and backward (6N per token; LoRA: 4N, no
    weight gradients) and the reference's forward (2N)."""
    tokens = 2 * config.batch_size * config.seq_len
    policy = metrics_lib.flops_per_token(model_cfg, config.seq_len, lora_settings(config) is not None)
    reference = metrics_lib.flops_per_token(model_cfg, config.seq_len) / 3
    return tokens, (policy + reference) * tokens
