"""The `dpo` recipe: direct preference optimisation (Rafailov et al. 2023) with TRL's defaults
(β 0.1, the sigmoid loss) and Zephyr-7B-β's schedule (learning rate 5e-7, 10% warmup, one epoch).

  python train.py --config configs/dpo.py --workdir runs/dpo_7b \\
      --config.init_from=/path/to/sft-7b --config.data.sources.pairs.path=prefs.jsonl

The reference is the `init_from` model, frozen (a compute-dtype copy, outside the optimiser state).
"""

import ml_collections

from configs import reward


def get_config():
  config = reward.get_config()
  config.recipe = "dpo"
  config.dpo = ml_collections.ConfigDict()
  config.dpo.beta = 0.1  # the KL strength: implicit rewards are beta * log(pi / pi_ref)
  config.dpo.loss = "sigmoid"  # "sigmoid" (DPO) or "ipo" (Azar et al. 2023)
  config.dpo.nll_coef = 0.0  # weight of the chosen answers' NLL per token (Llama 3: 0.2); 0: plain DPO

  config.optimizer.lr = 5e-7
  config.optimizer.warmup_ratio = 0.1
  config.eval_every = 100  # dpo/... and the same on held-out pairs under eval/
  return config
