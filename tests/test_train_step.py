import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from llama_jax.config import ModelConfig
from llama_jax.model import init_params
from llama_jax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from llama_jax.train.step import TrainState, make_train_step

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)


def _opt(**kw):
  opt = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1, b1=0.9, b2=0.95,
                                       eps=1e-8, weight_decay=0.1, clip_norm=1.0, grad_accum_steps=1,
                                       z_loss=0.0))
  opt.update(kw)
  return opt


def _state(tx, seed=0):
  params = nn.unbox(init_params(CFG, jax.random.key(seed)))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    nonfinite_steps=jnp.zeros((), jnp.int32))


def _batch(b, t, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (b, t + 1)).astype(np.int32)
  mask = (rng.random((b, t)) > 0.2).astype(np.float32)  # uneven counts per row: the sums must add up
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "segment_ids": np.zeros((b, t), np.int32), "loss_mask": mask}


@pytest.mark.slow
def test_micro_batches_equal_one_large_batch():
  batch = _batch(8, 16)
  results = []
  for k in (1, 4):
    opt = _opt(grad_accum_steps=k)
    tx = make_optimizer(opt, 100)
    step = jax.jit(make_train_step(CFG, tx, opt, learning_rate_schedule(opt, 100)))
    state, metrics = step(_state(tx), batch)
    results.append((state, metrics))
  (s1, m1), (s4, m4) = results
  np.testing.assert_allclose(float(m1["train/loss"]), float(m4["train/loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m1["train/grad_norm"]), float(m4["train/grad_norm"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_learning_rate_at_warmup_end_and_last_step():
  opt = _opt(lr=3e-4, warmup_steps=20, min_lr_ratio=0.1)
  schedule = learning_rate_schedule(opt, 200)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(20)), 3e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(200)), 3e-5, rtol=1e-6)
  assert 3e-5 < float(schedule(110)) < 3e-4


@pytest.mark.slow
def test_train_step_reports_the_schedules_learning_rate():
  opt = _opt(lr=1e-2, warmup_steps=4)
  tx = make_optimizer(opt, 50)
  step = jax.jit(make_train_step(CFG, tx, opt, learning_rate_schedule(opt, 50)))
  state = _state(tx)
  lrs = []
  for _ in range(5):
    state, metrics = step(state, _batch(2, 8))
    lrs.append(float(metrics["train/lr"]))
  np.testing.assert_allclose(lrs, [0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2], rtol=1e-6, atol=1e-9)
  assert int(state.step) == 5


def test_weight_decay_skips_norm_weights():
  params = nn.unbox(init_params(CFG, jax.random.key(0)))
  mask = decay_mask(params)
  assert mask["layers"]["block"]["attention_norm"]["weight"] is False
  assert mask["layers"]["block"]["ffn_norm"]["weight"] is False
  assert mask["norm"]["weight"] is False
  assert mask["layers"]["block"]["attention"]["wq"] is True
  assert mask["tok_embeddings"] is True


def test_non_finite_step_leaves_state_untouched():
  opt = _opt()
  tx = make_optimizer(opt, 100)
  step = jax.jit(make_train_step(CFG, tx, opt, None))
  state = _state(tx)
  poisoned = jax.tree.map(lambda x: x, state)
  poisoned = poisoned.replace(params={**state.params, "norm": {"weight": state.params["norm"]["weight"] * jnp.nan}})
  new, metrics = step(poisoned, _batch(2, 8))
  assert not np.isfinite(float(metrics["train/loss"]))
  assert int(new.nonfinite_steps) == 1
  for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(poisoned.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loss_falls_on_a_learnable_sequence():
  opt = _opt(lr=1e-2, warmup_steps=5)
  tx = make_optimizer(opt, 60)
  step = jax.jit(make_train_step(CFG, tx, opt, None))
  state = _state(tx)
  pattern = np.tile(np.arange(16, dtype=np.int32), 4)[:17]
  batch = {"inputs": np.tile(pattern[:-1], (4, 1)), "targets": np.tile(pattern[1:], (4, 1)),
           "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)),
           "segment_ids": np.zeros((4, 16), np.int32), "loss_mask": np.ones((4, 16), np.float32)}
  losses = []
  for _ in range(60):
    state, metrics = step(state, batch)
    losses.append(float(metrics["train/loss"]))
  assert losses[0] > 3.5 and losses[-1] < 0.5, (losses[0], losses[-1])


@pytest.mark.slow  # transformers' Trainer arguments import PyTorch and accelerate: seconds
def test_a_warmup_ratio_rounds_up_as_the_hugging_face_trainer(tmp_path):
  # Vicuna's 3% through transformers' own TrainingArguments.get_warmup_steps (a warmup_steps below 1
  # is a ratio there): 150 steps x 0.03 = 4.5 is 5 warmup steps, where Python's round gives 4.
  import ml_collections
  from transformers import TrainingArguments
  from llama_jax.train.optimizer import warmup_steps
  reference = TrainingArguments(output_dir=str(tmp_path), warmup_steps=0.03, report_to=[])
  for num_steps in (150, 350, 1000, 50, 7):
    ours = warmup_steps(ml_collections.ConfigDict(dict(warmup_ratio=0.03, warmup_steps=0)), num_steps)
    assert ours == reference.get_warmup_steps(num_steps), num_steps
  assert reference.get_warmup_steps(150) == 5


def test_bfloat16_moments_follow_float32_adamw_and_store_half_the_bytes():
  import ml_collections
  from llama_jax.train.optimizer import make_optimizer
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32),
            "norm": jnp.ones((8,), jnp.float32)}
  base = dict(lr=1e-2, warmup_steps=0, warmup_ratio=0.0, min_lr_ratio=1.0, b1=0.9, b2=0.95,
              eps=1e-8, weight_decay=0.1, clip_norm=1.0)
  runs = {}
  for dtype in ("float32", "bfloat16"):
    tx = make_optimizer(ml_collections.ConfigDict(dict(base, moments_dtype=dtype)), 100)
    state, p = tx.init(params), params
    for step in range(20):
      grads = jax.tree.map(lambda x: jnp.sin(x * (step + 1)), p)
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    runs[dtype] = (p, state)
  moments = [x for x in jax.tree.leaves(runs["bfloat16"][1]) if x.ndim]
  assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
  for a, b in zip(jax.tree.leaves(runs["float32"][0]), jax.tree.leaves(runs["bfloat16"][0])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-3)


def test_reported_loss_is_the_mean_over_counted_tokens_only():
  # An independent reference: optax's cross-entropy of the model's logits, averaged over the
  # unmasked positions (a loss divided by every position would be smaller by the masked share).
  opt = _opt()
  tx = make_optimizer(opt, 100)
  state = _state(tx)
  batch = _batch(3, 12, seed=5)
  batch["loss_mask"][0, :7] = 0.0  # a third of the first row masked, on top of the random mask
  _, metrics = jax.jit(make_train_step(CFG, tx, opt, learning_rate_schedule(opt, 100)))(state, batch)
  from llama_jax.model import forward
  logits = forward(CFG, state.params, jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]))
  ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(batch["targets"])))
  mask = batch["loss_mask"]
  np.testing.assert_allclose(float(metrics["train/loss"]), (ce * mask).sum() / mask.sum(), rtol=1e-5)
  assert abs((ce * mask).sum() / mask.size - float(metrics["train/loss"])) > 1e-3


def test_the_optimizer_clips_the_global_norm_before_adamw():
  # The reference chain written out with optax: clip_by_global_norm(1.0), then AdamW. Gradients
  # whose norms vary around the threshold make the two differ if clipping were missing (Adam's
  # update is scale-free only for a constant scale).
  opt = _opt(warmup_steps=0, clip_norm=1.0)
  ours = make_optimizer(opt, 100)
  schedule = learning_rate_schedule(opt, 100)
  adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                      mask=decay_mask)
  reference = optax.chain(optax.clip_by_global_norm(1.0), adamw)
  params = nn.unbox(init_params(CFG, jax.random.key(0)))
  rng = np.random.default_rng(0)
  states = [tx.init(params) for tx in (ours, reference, adamw)]
  outs = [params, params, params]
  for scale in (30.0, 0.2, 5.0, 0.05):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32) * scale, params)
    grads = jax.tree.map(lambda g: g / optax.tree.norm(grads) * scale, grads)  # global norm = scale
    for i, tx in enumerate((ours, reference, adamw)):
      updates, states[i] = tx.update(grads, states[i], outs[i])
      outs[i] = optax.apply_updates(outs[i], updates)
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  unclipped = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[2])))
  assert unclipped > 1e-4  # the test can tell clipping from no clipping


def test_adamw_decays_matrices_and_leaves_norm_weights_alone():
  # With zero gradients AdamW's update is the decoupled decay alone: p <- p (1 - lr * wd) where
  # the mask says so. RMSNorm weights (ones) must come out exactly unchanged.
  opt = _opt(warmup_steps=0, weight_decay=0.5, lr=0.1, min_lr_ratio=1.0)
  tx = make_optimizer(opt, 10)
  params = nn.unbox(init_params(CFG, jax.random.key(0)))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(new["norm"]["weight"]), np.asarray(params["norm"]["weight"]))
  np.testing.assert_array_equal(np.asarray(new["layers"]["block"]["ffn_norm"]["weight"]),
                                np.asarray(params["layers"]["block"]["ffn_norm"]["weight"]))
  w = params["layers"]["block"]["attention"]["wq"]
  np.testing.assert_allclose(np.asarray(new["layers"]["block"]["attention"]["wq"]),
                             np.asarray(w) * (1 - 0.1 * 0.5), rtol=1e-6)


def test_each_micro_batch_gets_a_draw_of_its_own():
  # LoRA's dropout key comes from the view's `draw`: micro-batches of one step must not share it.
  # A view that scales the parameter by (1 + draw) makes the summed gradient tell the draws apart.
  from llama_jax.train.step import gradient_step
  params = {"w": jnp.ones((3,))}
  tx = optax.sgd(0.0)
  state = TrainState(step=jnp.asarray(5, jnp.int32), params=params, opt_state=tx.init(params),
                     nonfinite_steps=jnp.zeros((), jnp.int32))
  view = lambda p, frozen, draw: {"w": p["w"] * (1 + draw)}  # noqa: E731
  def objective(p, micro):
    total = jnp.sum(p["w"]) * micro["x"].shape[0]
    return total, jnp.float32(1), {"loss": total}

  batch = {"x": jnp.ones((4, 2))}
  for accum in (1, 2):
    _, metrics, count = gradient_step(state, batch, objective, tx=tx, grad_accum_steps=accum, view=view)
    draws = [5 * accum + i for i in range(accum)]  # step 5: draws 5; and 10, 11
    rows = 4 // accum
    expected = sum((1 + d) * rows for d in draws) / accum  # summed over micro-batches, over the count
    np.testing.assert_allclose(metrics["train/grad_norm"], expected * np.sqrt(3), rtol=1e-6)


def test_clip_norm_zero_means_no_clipping_and_a_negative_one_is_refused():
  params = {"w": jnp.ones((4,))}
  grads = {"w": jnp.full((4,), 100.0)}  # norm 200: clipping at 1.0 would scale it by 1/200
  unclipped = optax.adamw(learning_rate_schedule(_opt(warmup_steps=0), 100), b1=0.9, b2=0.95, eps=1e-8,
                          weight_decay=0.1, mask=decay_mask)
  want, _ = unclipped.update(grads, unclipped.init(params), params)
  tx = make_optimizer(_opt(clip_norm=0.0, warmup_steps=0), 100)
  got, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(got["w"], want["w"])
  assert np.abs(np.asarray(got["w"])).max() > 0  # it trains (clipping at 0 would not)
  with pytest.raises(ValueError, match="clip_norm"):
    make_optimizer(_opt(clip_norm=-1.0), 100)


@pytest.mark.parametrize("field, value", [("lr", -1.0), ("warmup_steps", -5), ("warmup_ratio", 1.0),
                                          ("min_lr_ratio", 1.5), ("b1", 1.0), ("b2", -0.1), ("eps", -1e-8),
                                          ("weight_decay", -0.1), ("z_loss", -1.0),
                                          ("moments_dtype", "float16")])
def test_optimizer_settings_no_run_wants_are_refused_by_name(field, value):
  # A negative lr trains (gradient ascent: the loss climbs), a negative warmup is taken as none:
  # each is one error naming its field, before anything runs.
  with pytest.raises(ValueError, match=f"optimizer.{field} must be"):
    make_optimizer(_opt(**{field: value}), 100)
  make_optimizer(_opt(), 100)  # the defaults' ranges pass
