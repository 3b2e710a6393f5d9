"""LoRA: the trainable parameter count (against PEFT's own count), fresh adapters leave the model
unchanged, merged equals attached equals a numpy merge, PEFT loads the exported adapters with equal
logits, training touches only the adapters (float and quantized bases), a run's workdir loads,
merges and exports, and bad input is one line."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

import llama_jax
from llama_jax import checkpoint, projection, sharding
from llama_jax import model as M
from llama_jax.config import ModelConfig, to_config_dict
from llama_jax.convert import cli as convert
from llama_jax.lora import adapters as adapters_lib
from llama_jax.lora import files, peft_format
from llama_jax.lora.config import LoraConfig
from test_train import corpus, read_metrics, run_train, write_config  # noqa: F401  (corpus: a fixture)

transformers.logging.set_verbosity_error()

TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_hidden_dim=96,
                   max_seq_len=64)
TOKENS = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 11))


def _adapters(cfg, lora, seed=1, scale=0.1):
  """Adapters with b random too (fresh ones have b = 0 and change nothing)."""
  tree = nn.unbox(adapters_lib.init_adapters(cfg, lora, jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.normal(size=x.shape) * scale, jnp.float32) if p[-1].key == "b" else x, tree)


@pytest.fixture(scope="module")
def params():
  return nn.unbox(M.init_params(TINY, jax.random.key(0)))


def _logits(cfg, params):
  return np.asarray(M.forward(cfg, params, jnp.asarray(TOKENS)))


def test_rank_r_adapters_have_exactly_r_times_fan_in_plus_fan_out_parameters():
  lora = LoraConfig(rank=4, target_modules=("q_proj", "wv", "w2"))  # HF names are accepted too
  count = adapters_lib.count(adapters_lib.init_adapters(TINY, lora, jax.random.key(0)))
  # wq 64 -> 4*16, wv 64 -> 2*16, w2 96 -> 64; two layers
  assert count == 2 * 4 * ((64 + 64) + (64 + 32) + (96 + 64))
  everything = LoraConfig(rank=8)
  assert adapters_lib.count(adapters_lib.init_adapters(TINY, everything, jax.random.key(0))) == (
      2 * 8 * (2 * (64 + 64) + 2 * (64 + 32) + 2 * (64 + 96) + (96 + 64)))


def test_fresh_adapters_give_the_base_model_exactly(params):
  lora = LoraConfig(rank=4, alpha=32.0)
  fresh = nn.unbox(adapters_lib.init_adapters(TINY, lora, jax.random.key(1)))
  np.testing.assert_array_equal(_logits(TINY, adapters_lib.attach(params, fresh, lora)), _logits(TINY, params))


def test_merged_model_equals_base_plus_adapters(params):
  lora = LoraConfig(rank=4, alpha=8.0, target_modules=("wq", "wo", "w1"))
  ab = _adapters(TINY, lora)
  attached = _logits(TINY, adapters_lib.attach(params, ab, lora))
  merged = adapters_lib.merge(params, ab, lora)
  assert not projection.is_structured(merged["layers"]["block"]["attention"]["wo"])
  # The merge written out in numpy: W (L, in..., out...) + alpha/r * a (L, in..., r) b (L, r, out...)
  manual = jax.tree.map(np.asarray, params)
  for module, name in (("attention", "wq"), ("attention", "wo"), ("feed_forward", "w1")):
    a, b = np.asarray(ab["layers"]["block"][module][name]["a"]), np.asarray(ab["layers"]["block"][module][name]["b"])
    w = manual["layers"]["block"][module][name]
    delta = np.einsum("lkr,lro->lko", a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], b.shape[1], -1))
    manual["layers"]["block"][module][name] = w + 2.0 * delta.reshape(w.shape)
  np.testing.assert_allclose(_logits(TINY, merged), attached, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_logits(TINY, manual), attached, rtol=1e-5, atol=1e-5)
  assert np.abs(attached - _logits(TINY, params)).max() > 1e-3  # the adapters do something


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    rms_norm_eps=1e-5)
  path = tmp_path_factory.mktemp("hf")
  transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
  return path


def test_peft_loads_the_exported_adapters_with_equal_logits(hf_base, tmp_path):
  import peft
  lora = LoraConfig(rank=4, alpha=16.0, target_modules=("wq", "wk", "wv", "wo", "w1", "w3", "w2"))
  base = llama_jax.load(hf_base)
  ab = _adapters(base.config, lora, seed=3)
  ours = _logits(base.config, adapters_lib.attach(base.params, ab, lora))
  peft_format.export_peft(ab, lora, str(tmp_path / "adapter"))

  model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(hf_base),
                                         str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(TOKENS)).logits.float().numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())

  # PEFT's own adapters for the same settings: the same tensor names and shapes, and the same
  # trainable parameter count as ours.
  own = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(hf_base), peft.LoraConfig(
      r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"]))
  theirs_state = peft.get_peft_model_state_dict(own)
  exported = peft_format.peft_tensors(ab)
  assert {k: tuple(v.shape) for k, v in theirs_state.items()} == {k: v.shape for k, v in exported.items()}
  assert own.get_nb_trainable_parameters()[0] == adapters_lib.count(ab)


# --- training

def _training_config(**lora):
  from configs import default
  config = default.get_config()
  config.model = to_config_dict(TINY)
  config.batch_size, config.seq_len, config.num_steps = 8, 16, 40
  config.optimizer.lr, config.optimizer.warmup_steps, config.optimizer.weight_decay = 2e-2, 0, 0.0
  for key, value in lora.items():
    setattr(config.lora, key, value)
  return config


def _train(config, steps):
  from llama_jax.bench.train import synthetic_batch
  from llama_jax.train.loop import make_training
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])  # meshes are test_train's business
  run = make_training(config, TINY, mesh)
  losses = []
  with sharding.activation_rules(mesh, config.mesh.rules):
    batch = jax.device_put(synthetic_batch(TINY.vocab_size, config.batch_size, config.seq_len), run.batch_sharding)
    state = run.init(jax.random.key(0))
    frozen_before = jax.tree.map(np.asarray, state.frozen)
    for _ in range(steps):
      state, metrics = run.step(state, batch)
      losses.append(float(metrics["train/loss"]))
  return run, state, frozen_before, losses


@pytest.mark.parametrize("quantize_base", ["", "int4"])
def test_the_training_state_holds_adapters_and_a_frozen_base(quantize_base):
  # Shapes only (no compilation): what make_training will train, keep frozen, and checkpoint.
  from llama_jax.train.loop import make_training
  config = _training_config(rank=4, quantize_base=quantize_base)
  run = make_training(config, TINY, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  state = run.abstract_state
  count = adapters_lib.count(state.params)
  assert count == adapters_lib.expected_count(TINY, LoraConfig(rank=4))
  assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * count
  assert {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]} == {"a", "b"}
  w2 = state.frozen["layers"]["block"]["feed_forward"]["w2"]
  assert projection.is_quantized(w2) == bool(quantize_base)
  assert jax.tree.structure(run.placed("params")) == jax.tree.structure(state.params)


@pytest.mark.slow
@pytest.mark.parametrize("quantize_base", ["", "int8", "int4"])
def test_lora_trains_only_the_adapters_on_a_float_or_quantized_base(quantize_base):
  lora = LoraConfig(rank=4, quantize_base=quantize_base)
  run, state, frozen_before, losses = _train(_training_config(rank=4, quantize_base=quantize_base), 15)
  count = adapters_lib.count(state.params)
  assert count == adapters_lib.expected_count(TINY, lora)
  # The optimiser's moments cover the adapters and nothing else.
  assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * count
  wq = state.frozen["layers"]["block"]["attention"]["wq"]
  assert projection.is_quantized(wq) == bool(quantize_base)
  if quantize_base:
    assert wq.bits == (8 if quantize_base == "int8" else 4)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen), frozen_before)
  assert losses[-1] < losses[0] - 0.3, losses


def test_lora_dropout_changes_the_training_loss_but_not_evaluation(params):
  lora = LoraConfig(rank=4, dropout=0.5)
  ab = _adapters(TINY, lora)
  key = jax.random.key(0)
  train_view = adapters_lib.attach(params, ab, lora, key)
  eval_view = adapters_lib.attach(params, ab, lora)
  no_dropout = adapters_lib.attach(params, ab, LoraConfig(rank=4))
  assert np.abs(_logits(TINY, train_view) - _logits(TINY, eval_view)).max() > 1e-4
  np.testing.assert_array_equal(_logits(TINY, eval_view), _logits(TINY, no_dropout))


def test_a_module_that_does_not_exist_is_a_config_error():
  from llama_jax.train.loop import make_training
  config = _training_config(rank=4, target_modules="wq,q_proj,attn_proj")
  with pytest.raises(ValueError, match="no module 'attn_proj' in the model; the projections are wq, wk"):
    make_training(config, TINY, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))


# --- a run's workdir: loading, merging, exporting

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, params):
  """A saved base model and a LoRA run's workdir over it (lora.json and one step of adapters), as
  the training loop leaves them."""
  root = tmp_path_factory.mktemp("lora_run")
  checkpoint.save_model(str(root / "base"), TINY, params)
  lora = LoraConfig(rank=4, alpha=8.0, target_modules=("wq", "wv", "w2"))
  ab = _adapters(TINY, lora, seed=5)
  run = root / "run"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(run / checkpoint.CHECKPOINTS / "7" / "params"), ab)
  checkpoint.write_model_config(str(run), TINY)
  files.write_info(str(run), lora, str(root / "base"), adapters_lib.fingerprint(params))
  return root, lora, ab


@pytest.mark.slow
def test_a_lora_run_loads_merged_and_merges_on_the_command_line(lora_run, params):
  root, lora, ab = lora_run
  expected = _logits(TINY, adapters_lib.attach(params, ab, lora))
  np.testing.assert_allclose(llama_jax.load(root / "run").logits(TOKENS), expected, rtol=1e-5, atol=1e-5)
  # Not over the run's own base (its default --base), which the run still needs.
  assert convert.main(["--input", str(root / "run"), "--merge_lora", "--output", str(root / "base")]) == 1
  assert convert.main(["--input", str(root / "run"), "--merge_lora", "--output", str(root / "merged")]) == 0
  merged = llama_jax.load(root / "merged")
  assert not projection.is_structured(merged.params["layers"]["block"]["attention"]["wq"])
  np.testing.assert_allclose(merged.logits(TOKENS), expected, rtol=1e-5, atol=1e-5)
  assert convert.main(["--input", str(root / "run"), "--to", "peft", "--output", str(root / "peft")]) == 0
  config = json.loads((root / "peft" / peft_format.CONFIG).read_text())
  assert config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj", "down_proj"]
  assert os.path.isfile(root / "peft" / peft_format.WEIGHTS)


@pytest.mark.slow
def test_a_lora_reward_run_loads_as_a_reward_model(lora_run, params, tmp_path):
  # A reward run with config.lora saves its adapters and its score head; the reward model is the
  # base's backbone with the adapters merged, under that head (what PPO's reward_model reads).
  from llama_jax import load_reward_model
  from llama_jax.align.reward import RewardModel
  root, lora, ab = lora_run
  score = jnp.asarray(np.random.default_rng(7).normal(size=(TINY.dim,)), jnp.float32)
  run = tmp_path / "reward_run"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(run / checkpoint.CHECKPOINTS / "3" / "params"), {**ab, "score": score})
  checkpoint.write_model_config(str(run), TINY)
  backbone = {k: v for k, v in params.items() if k != "output"}  # what the run's frozen base held
  files.write_info(str(run), lora, str(root / "base"), adapters_lib.fingerprint(backbone))
  rm = load_reward_model(run)
  assert "output" not in rm.params and not projection.is_structured(rm.params["layers"]["block"]["attention"]["wq"])
  merged = {k: v for k, v in adapters_lib.merge(params, ab, lora).items() if k != "output"}
  expected = RewardModel(TINY, {**merged, "score": score}).score_tokens(TOKENS.tolist())
  np.testing.assert_allclose(rm.score_tokens(TOKENS.tolist()), expected, rtol=1e-5, atol=1e-5)
  assert np.ptp(expected) > 0
  # Merged on the command line it stays a reward model (the trained score head is kept), in our
  # format and in Hugging Face's; PEFT's causal-LM adapters have no place for the head.
  assert convert.main(["--input", str(run), "--merge_lora", "--output", str(tmp_path / "merged")]) == 0
  np.testing.assert_allclose(load_reward_model(tmp_path / "merged").score_tokens(TOKENS.tolist()), expected,
                             rtol=1e-5, atol=1e-5)
  assert convert.main(["--input", str(run), "--merge_lora", "--to", "hf", "--output", str(tmp_path / "hf")]) == 0
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
      "LlamaForSequenceClassification"]
  assert convert.main(["--input", str(run), "--to", "peft", "--output", str(tmp_path / "peft")]) == 1


def _run_over_int8(tmp_path, params):
  """A LoRA run over an int8 checkpoint of `python -m llama_jax.quantize`: (its base, adapters, the
  run loaded)."""
  from llama_jax.quantize.__main__ import main as quantize
  checkpoint.save_model(str(tmp_path / "base"), TINY, params)
  quantize(["--model", str(tmp_path / "base"), "--output", str(tmp_path / "int8"), "--bits", "8"])
  base = llama_jax.load(tmp_path / "int8")
  lora = LoraConfig(rank=2)
  ab = _adapters(TINY, lora, seed=6)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / "run" / checkpoint.CHECKPOINTS / "3" / "params"), ab)
  checkpoint.write_model_config(str(tmp_path / "run"), TINY)
  files.write_info(str(tmp_path / "run"), lora, str(tmp_path / "int8"), adapters_lib.fingerprint(base.params))
  return base, adapters_lib.attach(base.params, ab, lora), llama_jax.load(tmp_path / "run")


@pytest.mark.slow
def test_a_lora_run_over_a_quantized_base_keeps_it_quantized(tmp_path, params):
  _, attached, loaded = _run_over_int8(tmp_path, params)
  # Nothing a fine-tuning run can start from (its adapters stay attached to integers): one line.
  from llama_jax.sharding import ConfigError
  from llama_jax.train.loop import _check_init_from
  with pytest.raises(ConfigError, match="is a LoRA run over a quantized base"):
    _check_init_from(str(tmp_path / "run"), TINY, trains_adapters=False)
  _check_init_from(str(tmp_path / "base"), TINY, trains_adapters=False)  # the float base is fine
  wq = loaded.params["layers"]["block"]["attention"]["wq"]
  assert isinstance(wq, projection.LoraWeight) and projection.is_quantized(wq.base)
  np.testing.assert_allclose(loaded.logits(TOKENS), _logits(TINY, attached), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_engine_decodes_adapters_over_a_quantized_base(tmp_path, params):
  from llama_jax.generate import generate_tokens
  _, _, loaded = _run_over_int8(tmp_path, params)
  (new, logits), = generate_tokens(loaded.config, loaded.params, [[1, 5, 9]], 4, return_logits=True)
  full = loaded.logits(np.array([[1, 5, 9] + new[:3]]))[0]
  for s in range(4):  # each token drawn from the logits a full forward pass gives
    np.testing.assert_allclose(logits[s], full[2 + s], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_merging_into_another_base_is_one_line(lora_run, tmp_path, capsys):
  root, _, _ = lora_run
  other = nn.unbox(M.init_params(TINY, jax.random.key(9)))  # same shape, other weights
  checkpoint.save_model(str(tmp_path / "other"), TINY, other)
  wider = TINY.replace(dim=128)
  checkpoint.save_model(str(tmp_path / "wider"), wider, nn.unbox(M.init_params(wider, jax.random.key(0))))
  for base, message in ((tmp_path / "other", "the adapters were trained on a base with hash"),
                        (tmp_path / "wider", "the adapters fit a model with dim 64, but")):
    capsys.readouterr()
    code = convert.main(["--input", str(root / "run"), "--merge_lora", "--base", str(base),
                         "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and message in err and len(err.splitlines()) == 1, err
    assert str(base) in err
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_train_py_runs_lora_resumes_exactly_and_rejects_unknown_modules(corpus, tmp_path):
  """The real entry point: a base run, a LoRA run from it (dropout on), the same run preempted and
  resumed, and a config naming a module the model lacks."""
  base_cfg = write_config(tmp_path / "base.py", corpus, num_steps=6)
  code, _, err = run_train(base_cfg, tmp_path / "base")
  assert code == 0, err[-3000:]
  lora_cfg = write_config(tmp_path / "lora.py", corpus, num_steps=10, log_every=1, init_from=str(tmp_path / "base"))
  flags = ("--config.lora.rank=4", "--config.lora.dropout=0.1")
  code, _, err = run_train(lora_cfg, tmp_path / "straight", *flags)
  assert code == 0, err[-3000:]
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(str(tmp_path / "straight" / "checkpoints" / "10" / "params"))
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  assert leaves and {p[-1].key for p, _ in leaves} == {"a", "b"}  # the adapters alone

  code, _, err = run_train(lora_cfg, tmp_path / "resumed", *flags, env={"LLAMA_JAX_PREEMPT_AT_STEP": "5"})
  assert code != 0
  code, _, err = run_train(lora_cfg, tmp_path / "resumed", *flags)
  assert code == 0, err[-3000:]
  np.testing.assert_allclose(read_metrics(tmp_path / "resumed")[-1]["train/loss"],
                             read_metrics(tmp_path / "straight")[-1]["train/loss"], rtol=1e-5)
  model = llama_jax.load(tmp_path / "straight")
  assert np.isfinite(model.logits(np.array([[1, 5, 9]]))).all()

  code, _, err = run_train(lora_cfg, tmp_path / "bad", "--config.lora.rank=4",
                           "--config.lora.target_modules=wq,attn")
  assert code == 1 and "no module 'attn' in the model" in err and "Traceback" not in err, err[-2000:]

  # A LoRA run killed before its first checkpoint leaves lora.json alone in its workdir: a fresh
  # LoRA run there (onto another base) and a full run there both start, and the full run's
  # checkpoints load as a whole model, not as adapters.
  info = json.loads((tmp_path / "straight" / "lora.json").read_text())
  for name in ("killed_then_lora", "killed_then_full"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "lora.json").write_text(json.dumps({**info, "base_fingerprint": "another base"}))
  code, _, err = run_train(lora_cfg, tmp_path / "killed_then_lora", *flags, "--config.num_steps=2")
  assert code == 0, err[-3000:]
  code, _, err = run_train(base_cfg, tmp_path / "killed_then_full", "--config.num_steps=2")
  assert code == 0, err[-3000:]
  assert not (tmp_path / "killed_then_full" / "lora.json").exists()
  assert np.isfinite(llama_jax.load(tmp_path / "killed_then_full").logits(np.array([[1, 5, 9]]))).all()
