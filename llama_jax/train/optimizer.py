"""AdamW with linear warmup, cosine decay and global-norm clipping: the LLaMA paper's recipe
(section 2.2: β1 0.9, β2 0.95, weight decay 0.1, clipping at 1.0, 2000 warmup steps, decay to 10%)."""

from __future__ import annotations

import jax
import optax


def warmup_steps(opt_cfg, num_steps: int) -> int:
  """warmup_steps, or warmup_ratio of the run where that is set (Vicuna: 3%)."""
  ratio = float(opt_cfg.get("warmup_ratio", 0.0))
  return int(round(ratio * num_steps)) if ratio > 0 else int(opt_cfg.warmup_steps)


def learning_rate_schedule(opt_cfg, num_steps: int) -> optax.Schedule:
  """0 -> lr linearly over the warmup, then cosine to lr * min_lr_ratio at num_steps."""
  warmup = warmup_steps(opt_cfg, num_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=warmup,
      decay_steps=max(int(num_steps), warmup + 1), end_value=opt_cfg.lr * opt_cfg.min_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices only: RMSNorm weights (1-D per layer) are not decayed."""
  def decays(path, _):
    return not any(getattr(k, "key", None) in ("attention_norm", "ffn_norm", "norm") for k in path)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_cfg, num_steps: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(opt_cfg.clip_norm),
      optax.adamw(learning_rate_schedule(opt_cfg, num_steps), b1=opt_cfg.b1, b2=opt_cfg.b2,
                  eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay, mask=decay_mask),
  )
