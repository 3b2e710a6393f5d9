"""AdamW with linear warmup, cosine decay and global-norm clipping: the LLaMA paper's recipe
(section 2.2: β1 0.9, β2 0.95, weight decay 0.1, clipping at 1.0, 2000 warmup steps, decay to 10%).

`optimizer.moments_dtype = "bfloat16"` stores Adam's two moments in bfloat16 (updated in float32):
the optimizer state drops from 8 to 4 bytes a parameter, which is what lets LLaMA-2-13B (float32
parameters and gradients) train on two 141 GB GPUs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def warmup_steps(opt_cfg, num_steps: int) -> int:
  """warmup_steps, or warmup_ratio of the run where that is set (Vicuna: 3%), rounded up as the
  Hugging Face Trainer that Vicuna's scripts ran rounds it (`TrainingArguments.get_warmup_steps`)."""
  ratio = float(opt_cfg.get("warmup_ratio", 0.0))
  return math.ceil(num_steps * ratio) if ratio > 0 else int(opt_cfg.warmup_steps)


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


def scale_by_adam(b1: float, b2: float, eps: float, moments_dtype) -> optax.GradientTransformation:
  """optax.scale_by_adam (Kingma & Ba 2015, bias-corrected) with both moments stored in
  `moments_dtype`; the arithmetic is float32 whatever the storage."""
  moments_dtype = jnp.dtype(moments_dtype)

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, moments_dtype)  # noqa: E731
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params),
                                  nu=jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), updates, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), updates, state.nu)
    count = optax.safe_increment(state.count)
    c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
    out = jax.tree.map(lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), mu, nu, updates)
    store = lambda x: x.astype(moments_dtype)  # noqa: E731
    return out, optax.ScaleByAdamState(count=count, mu=jax.tree.map(store, mu), nu=jax.tree.map(store, nu))

  return optax.GradientTransformation(init, update)


def validate(opt_cfg) -> None:
  """Clear errors for settings no run wants (the ranges PyTorch's AdamW checks, and the schedule's):
  a negative learning rate would ascend the loss, a β of 1 never forgets its first gradient."""
  def field(name, default=0.0):
    return float(opt_cfg.get(name, default))

  if field("lr") < 0:
    raise ValueError(f"optimizer.lr must be >= 0, got {opt_cfg.lr}")
  if int(opt_cfg.get("warmup_steps", 0)) < 0:
    raise ValueError(f"optimizer.warmup_steps must be >= 0, got {opt_cfg.warmup_steps}")
  if not 0 <= field("warmup_ratio") < 1:
    raise ValueError(f"optimizer.warmup_ratio must be in [0, 1) (0: warmup_steps), got {opt_cfg.warmup_ratio}")
  if not 0 <= field("min_lr_ratio") <= 1:
    raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], got {opt_cfg.min_lr_ratio}")
  for name in ("b1", "b2"):
    if not 0 <= field(name, 0.9) < 1:
      raise ValueError(f"optimizer.{name} must be in [0, 1), got {opt_cfg[name]}")
  for name in ("eps", "weight_decay", "z_loss"):
    if field(name) < 0:
      raise ValueError(f"optimizer.{name} must be >= 0, got {opt_cfg[name]}")
  moments_dtype = str(opt_cfg.get("moments_dtype", "float32"))
  if moments_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"optimizer.moments_dtype must be 'float32' or 'bfloat16', got {moments_dtype!r}")
  if field("clip_norm", 1.0) < 0:
    raise ValueError(f"optimizer.clip_norm must be >= 0 (0: no clipping), got {opt_cfg.clip_norm}")


def make_optimizer(opt_cfg, num_steps: int) -> optax.GradientTransformation:
  validate(opt_cfg)
  moments_dtype = str(opt_cfg.get("moments_dtype", "float32"))
  if moments_dtype == "float32":  # optax's own AdamW
    adam = optax.adamw(learning_rate_schedule(opt_cfg, num_steps), b1=opt_cfg.b1, b2=opt_cfg.b2,
                       eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay, mask=decay_mask)
  else:  # the same chain (optax.adamw's), moments stored in bfloat16
    adam = optax.chain(scale_by_adam(opt_cfg.b1, opt_cfg.b2, opt_cfg.eps, moments_dtype),
                       optax.add_decayed_weights(opt_cfg.weight_decay, decay_mask),
                       optax.scale_by_learning_rate(learning_rate_schedule(opt_cfg, num_steps)))
  clip_norm = float(opt_cfg.clip_norm)
  if clip_norm == 0:  # as Hugging Face's max_grad_norm=0 (clipping at 0 would train nothing)
    return adam
  return optax.chain(optax.clip_by_global_norm(clip_norm), adam)
