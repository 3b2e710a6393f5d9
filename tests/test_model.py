import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax
from llama_jax import model as M
from llama_jax.config import PRESETS, ModelConfig, num_params, preset

TINY = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=101, multiple_of=16,
                   max_seq_len=64)


def _params(cfg, seed=0):
  return nn.unbox(M.init_params(cfg, jax.random.key(seed)))


def _tokens(shape, vocab, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_causality():
  params = _params(TINY)
  tokens = _tokens((1, 16), TINY.vocab_size)
  base = M.forward(TINY, params, tokens)
  t = 9
  changed = tokens.at[0, t].set((tokens[0, t] + 1) % TINY.vocab_size)
  out = M.forward(TINY, params, changed)
  np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
  assert np.abs(np.asarray(out[:, t:] - base[:, t:])).max() > 1e-4


def test_rotary_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(i, j):
    qi = M.rotary(q, M.rotary_tables(jnp.array([[i]]), ModelConfig(dim=16, n_heads=1)))
    kj = M.rotary(k, M.rotary_tables(jnp.array([[j]]), ModelConfig(dim=16, n_heads=1)))
    return float(jnp.sum(qi * kj))

  for offset in (0, 3, 17):
    scores = [score(i + offset, i) for i in (0, 5, 40, 1000)]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-5)
  assert abs(score(5, 0) - score(0, 0)) > 1e-3  # and it does depend on the offset


def test_gqa_with_all_heads_equals_multi_head_attention():
  rng = np.random.default_rng(0)
  b, t, n, h = 2, 7, 4, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) for _ in range(3))
  idx = jnp.broadcast_to(jnp.arange(t), (b, t))
  out = M.xla_attention(q, k, v, M.attention_mask(idx, idx))
  # textbook multi-head attention, head by head
  scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
  scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
  ref = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, -1), v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_grouped_heads_equal_repeated_kv_heads():
  # GQA with K kv heads equals MHA whose K/V projections repeat each kv head G times.
  cfg = TINY
  params = _params(cfg)
  mha = dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)
  g = cfg.n_heads // cfg.n_kv_heads
  attn = dict(params["layers"]["block"]["attention"])
  attn["wk"] = jnp.repeat(attn["wk"], g, axis=2)
  attn["wv"] = jnp.repeat(attn["wv"], g, axis=2)
  mha_params = jax.tree.map(lambda x: x, params)
  mha_params["layers"]["block"]["attention"] = attn
  tokens = _tokens((2, 12), cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(M.forward(mha, mha_params, tokens)),
                             np.asarray(M.forward(cfg, params, tokens)), rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_full_forward():
  from llama_jax.generate import cache as kv, engine
  params = _params(TINY)
  tokens = _tokens((2, 12), TINY.vocab_size)
  full = np.asarray(M.forward(TINY, params, tokens))
  ep = engine.prepare_params(TINY, params)

  @jax.jit  # two compilations instead of every op on its own
  def step(tokens, positions, cache):
    x, cache = engine.forward(TINY, ep, tokens, positions, cache)
    return engine.logits_of(TINY, ep, x), cache

  cache = kv.init_cache(TINY, 2, 16)
  logits, cache = step(tokens[:, :5], jnp.broadcast_to(jnp.arange(5), (2, 5)), cache)
  steps = [logits]
  for t in range(5, 12):
    logits, cache = step(tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def _primitive_places(jaxpr, name, inside=False, found=None):
  """[inside a loop body?] for each use of primitive `name` in a jaxpr, sub-jaxprs included."""
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found.append(inside)
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else [value]):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          _primitive_places(inner, name, inside or eqn.primitive.name in ("scan", "while"), found)
  return found


def test_rotary_tables_are_made_once_per_forward_pass_not_per_layer():
  params = _params(TINY)
  jaxpr = jax.make_jaxpr(lambda p, t: M.Transformer(TINY).apply({"params": p}, t))(
      params, _tokens((1, 8), TINY.vocab_size))
  assert _primitive_places(jaxpr.jaxpr, "sin") == [False]  # one sin, outside the layers' loop
  assert _primitive_places(jaxpr.jaxpr, "cos") == [False]


def test_rms_norm_equals_its_formula_with_the_config_s_eps():
  # eps large enough to matter: a wrong or missing eps changes the output
  cfg = dataclasses.replace(TINY, norm_eps=0.5)
  x = np.random.default_rng(0).normal(size=(2, 3, cfg.dim)).astype(np.float32) * 0.3
  w = np.random.default_rng(1).normal(size=(cfg.dim,)).astype(np.float32)
  out = M.RMSNorm(cfg).apply({"params": {"weight": jnp.asarray(w)}}, jnp.asarray(x))
  ref = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 0.5) * w
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)


def test_feed_forward_is_w2_of_silu_w1_times_w3():
  cfg = TINY
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, cfg.dim)).astype(np.float32)
  w1, w3 = (rng.normal(size=(cfg.dim, cfg.hidden_dim)).astype(np.float32) * 0.1 for _ in range(2))
  w2 = rng.normal(size=(cfg.hidden_dim, cfg.dim)).astype(np.float32) * 0.1
  out = M.FeedForward(cfg).apply({"params": {"w1": w1, "w2": w2, "w3": w3}}, jnp.asarray(x))
  gate = x @ w1
  ref = (gate / (1 + np.exp(-gate)) * (x @ w3)) @ w2  # SwiGLU: silu on w1's output, not w3's
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scaling", [
    {},
    {"rope_type": "linear", "factor": 4.0},
    # Llama 3.1's and 3.2's settings; then one whose blend band holds several frequencies at h=32.
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 3.0, "low_freq_factor": 0.5, "high_freq_factor": 64.0,
     "original_max_position_embeddings": 1024},
])
def test_rotary_equals_transformers_at_nonzero_positions_and_theta(scaling):
  torch = pytest.importorskip("torch")
  from transformers import LlamaConfig
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
  theta, heads, h = 500000.0, 4, 32
  rng = np.random.default_rng(0)
  positions = np.array([[3, 17, 250, 1999, 40000]])
  q = rng.normal(size=(1, 5, heads, h)).astype(np.float32)
  k = rng.normal(size=(1, 5, heads, h)).astype(np.float32)
  kind = scaling.get("rope_type", "none")
  cfg = ModelConfig(dim=heads * h, n_heads=heads, rope_theta=theta, rope_scaling=kind,
                    rope_scaling_factor=scaling.get("factor", 1.0),
                    rope_low_freq_factor=scaling.get("low_freq_factor", 1.0),
                    rope_high_freq_factor=scaling.get("high_freq_factor", 4.0),
                    rope_original_max_seq_len=scaling.get("original_max_position_embeddings", 8192))
  rope = M.rotary_tables(jnp.asarray(positions), cfg)
  ours_q, ours_k = (np.asarray(M.rotary(jnp.asarray(a), rope)) for a in (q, k))
  hf_cfg = LlamaConfig(hidden_size=heads * h, num_attention_heads=heads, max_position_embeddings=65536,
                       rope_parameters={"rope_type": "default", "rope_theta": theta, **scaling})
  emb = LlamaRotaryEmbedding(hf_cfg)
  np.testing.assert_allclose(np.asarray(M.rotary_frequencies(cfg)), emb.inv_freq.numpy(), rtol=1e-6)
  tq, tk = (torch.from_numpy(a).transpose(1, 2).double() for a in (q, k))  # (B, heads, T, H)
  cos, sin = emb(tq, torch.from_numpy(positions))
  ref_q, ref_k = apply_rotary_pos_emb(tq, tk, cos.double(), sin.double())
  np.testing.assert_allclose(ours_q, ref_q.transpose(1, 2).numpy(), rtol=1e-4, atol=2e-4)
  np.testing.assert_allclose(ours_k, ref_k.transpose(1, 2).numpy(), rtol=1e-4, atol=2e-4)


def test_segment_ids_keep_attention_inside_documents():
  params = _params(TINY)
  a, b = _tokens((1, 6), TINY.vocab_size, 2), _tokens((1, 5), TINY.vocab_size, 3)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[0] * 6 + [1] * 5])
  positions = jnp.array([list(range(6)) + list(range(5))])
  out = M.Transformer(TINY).apply({"params": params}, packed, positions, segment_ids=segments)
  np.testing.assert_allclose(np.asarray(out[:, 6:]), np.asarray(M.forward(TINY, params, b)),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat_policy="full"),
                                     dict(remat_policy="save_matmuls"),
                                     dict(remat_policy="dots_and_attention"), dict(tie_embeddings=True)])
def test_variants_agree(variant):
  cfg = dataclasses.replace(TINY, **variant)
  params = _params(cfg)
  tokens = _tokens((2, 10), cfg.vocab_size)
  ref_cfg = dataclasses.replace(TINY, tie_embeddings=cfg.tie_embeddings)
  np.testing.assert_allclose(np.asarray(M.forward(cfg, params, tokens)),
                             np.asarray(M.forward(ref_cfg, params, tokens)), rtol=1e-5, atol=1e-5)

  def loss(p):
    return jnp.mean(M.forward(cfg, p, tokens) ** 2)

  def ref_loss(p):
    return jnp.mean(M.forward(ref_cfg, p, tokens) ** 2)

  g, g_ref = jax.grad(loss)(params), jax.grad(ref_loss)(params)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_dots_and_attention_saves_the_attention_forward_for_the_backward():
  """The policy's mechanism on a stand-in: a custom_vjp whose forward binds a primitive named as
  cuDNN's (`dot_product_attention_fwd_wrapper`; cuDNN itself needs a GPU). Under dots_no_batch the
  gradient runs that forward twice (once more to rebuild the residuals); under the policy, once."""
  fwd_p = jax.extend.core.Primitive("dot_product_attention_fwd_wrapper")
  fwd_p.def_impl(jnp.sin)
  fwd_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))

  @jax.custom_vjp
  def attention(x):
    return fwd_p.bind(x)

  attention.defvjp(lambda x: (fwd_p.bind(x), x), lambda x, g: (g * jnp.cos(x),))

  def block(w, x):
    return jnp.tanh(attention(x @ w)) @ w

  def forwards_run(policy):
    f = jax.checkpoint(block, policy=M.REMAT[policy])
    jaxpr = jax.make_jaxpr(jax.grad(lambda w, x: f(w, x).sum()))(jnp.ones((4, 4)), jnp.ones((2, 4)))
    return str(jaxpr).count("dot_product_attention_fwd_wrapper")

  assert forwards_run("dots_no_batch") == 2
  assert forwards_run("dots_and_attention") == 1
  # A tripwire: the name the policy matches is the one JAX's cuDNN attention binds (were it renamed,
  # the policy would silently save nothing more than dots_no_batch).
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fused
  assert cudnn_fused._dot_product_attention_fwd_p_wrapper.name == "dot_product_attention_fwd_wrapper"


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = dataclasses.replace(TINY, dtype="bfloat16")
  params = _params(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens = _tokens((1, 8), cfg.vocab_size)
  out = M.forward(cfg, params, tokens)
  ref = M.forward(TINY, params, tokens)
  assert out.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 2e-2


# The papers' parameter counts (LLaMA table 2; LLaMA 2 table 1; TinyLlama).
PAPER_COUNTS = {"llama_7b": 6.7e9, "llama_13b": 13.0e9, "llama_33b": 32.5e9, "llama_65b": 65.2e9,
                "llama2_7b": 6.7e9, "llama2_13b": 13.0e9, "llama2_70b": 69.0e9, "tinyllama_1b": 1.1e9}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_presets_shapes_and_counts(name):
  cfg = preset(name)
  shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
  counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
  assert counted == num_params(cfg)
  assert abs(counted - PAPER_COUNTS[name]) / PAPER_COUNTS[name] < 0.01, counted


def test_preset_facts():
  assert preset("llama2_70b").hidden_dim == 28672
  assert preset("llama_7b").hidden_dim == 11008
  assert preset("tinyllama_1b").hidden_dim == 5632
  assert set(PAPER_COUNTS) | {"tiny"} == set(PRESETS)


@pytest.mark.parametrize("bad, message", [
    (dict(dim=100, n_heads=8), "does not divide model.dim"),
    (dict(n_heads=8, n_kv_heads=3), "does not divide model.n_heads"),
    (dict(dtype="float64"), "model.dtype"),
])
def test_bad_shapes_name_the_field(bad, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(TINY, **bad)


def test_save_load_round_trip(tmp_path):
  params = _params(TINY, seed=3)
  model = llama_jax.Model(TINY, params)
  tokens = np.asarray(_tokens((2, 9), TINY.vocab_size))
  model.save(tmp_path / "m")
  loaded = llama_jax.load(tmp_path / "m")
  assert loaded.config == TINY
  np.testing.assert_array_equal(loaded.logits(tokens), model.logits(tokens))


def test_a_save_that_fails_leaves_the_model_it_was_saving_over(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  tokens = np.asarray(_tokens((2, 9), TINY.vocab_size))
  old = llama_jax.Model(TINY, _params(TINY, seed=3))
  old.save(tmp_path / "m")
  newer = llama_jax.Model(TINY, _params(TINY, seed=4))
  newer.save(tmp_path / "m")  # over it: the new one wins, nothing is left beside it
  np.testing.assert_array_equal(llama_jax.load(tmp_path / "m").logits(tokens), newer.logits(tokens))
  assert sorted(os.listdir(tmp_path / "m")) == ["model_config.json", "params"]

  def disk_full(*args, **kwargs):
    raise OSError("No space left on device")

  monkeypatch.setattr(ocp.Checkpointer, "save", disk_full)
  with pytest.raises(OSError, match="No space"):
    old.save(tmp_path / "m")
  monkeypatch.undo()
  np.testing.assert_array_equal(llama_jax.load(tmp_path / "m").logits(tokens), newer.logits(tokens))


def test_load_missing_path_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    llama_jax.load(tmp_path / "nope")


def test_output_head_gradients_run_in_the_compute_dtype_and_match_float32():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 40)) * 0.1, jnp.float32)
  t = jnp.asarray(rng.normal(size=(2, 3, 40)), jnp.float32)

  def loss(fn, x, w):
    return jnp.sum(fn(x, w) * t)

  plain = lambda x, w: jnp.einsum("BTD,DV->BTV", x, w)  # noqa: E731
  for ours, ref in zip(jax.grad(loss, (1, 2))(M.output_logits, x, w), jax.grad(loss, (1, 2))(plain, x, w)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)
  # bfloat16 inputs: float32 logits, bfloat16 gradients (no float32 matmul in the backward pass)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  assert M.output_logits(xb, wb).dtype == jnp.float32
  jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: loss(M.output_logits, x, w), (0, 1)))(xb, wb)
  backward = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]  # the forward's is inside
  assert len(backward) == 2 and all(v.aval.dtype == jnp.bfloat16 for e in backward for v in e.invars)
  gx, gw = jax.grad(lambda x, w: loss(M.output_logits, x, w), (0, 1))(xb, wb)
  ref_x, ref_w = jax.grad(loss, (1, 2))(plain, x, w)
  assert float(jnp.linalg.norm(gx.astype(jnp.float32) - ref_x) / jnp.linalg.norm(ref_x)) < 1e-2
  assert float(jnp.linalg.norm(gw.astype(jnp.float32) - ref_w) / jnp.linalg.norm(ref_w)) < 1e-2


def test_forward_traces_again_under_other_activation_rules():
  # model.forward's trace depends on the logical-axis rules in force, which jit's cache does not key
  # on by itself: the rules are part of the key, so a second rule set gets its own trace (and the
  # same logits), not the first one's sharding constraints.
  from llama_jax import sharding
  params, tokens = _params(TINY), _tokens((8, 16), TINY.vocab_size)
  mesh = sharding.make_mesh(2, 2, 2)
  split_width = dict(sharding.DEFAULT_RULES) | {"act_embed": "tensor"}
  M._forward.clear_cache()
  logits = []
  for rules in (sharding.DEFAULT_RULES, tuple(split_width.items())):
    with sharding.activation_rules(mesh, rules):
      logits.append(np.asarray(M.forward(TINY, params, tokens)))
  assert M._forward._cache_size() == 2
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)
