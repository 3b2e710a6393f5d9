"""llama_jax.load onto a mesh: parameters go straight into their shards, never whole on one device."""

import os

import jax
import numpy as np
import pytest
import torch
import transformers

import llama_jax
from llama_jax import sharding


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
  path = str(tmp_path_factory.mktemp("hf"))
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  return path


def test_load_onto_a_mesh_places_every_parameter_in_its_shards_directly(hf_dir, monkeypatch):
  # init_from goes through this path. Every device_put of the load must target the mesh's
  # shardings: a parameter put on one device first (the old path) would hold all of it there.
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  targets = []
  real_device_put = jax.device_put

  def spy(x, device=None, *args, **kwargs):
    targets.extend(jax.tree.leaves(device, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)))
    return real_device_put(x, device, *args, **kwargs)

  monkeypatch.setattr(jax, "device_put", spy)
  monkeypatch.setattr("llama_jax.api.jnp.asarray", lambda *a, **k: pytest.fail("a parameter was put whole"))
  model = llama_jax.load(hf_dir, mesh=mesh)
  assert targets and all(isinstance(t, jax.sharding.NamedSharding) and t.mesh == mesh for t in targets)
  wq = model.params["layers"]["block"]["attention"]["wq"]
  assert len(wq.sharding.device_set) == 8 and wq.addressable_shards[0].data.size < wq.size
  monkeypatch.undo()
  reference = llama_jax.load(hf_dir)
  tokens = np.array([[1, 5, 9, 2]])
  np.testing.assert_allclose(model.logits(tokens), reference.logits(tokens), rtol=1e-5, atol=1e-5)


def test_a_mesh_that_does_not_divide_the_model_is_a_config_error_naming_it(tmp_path):
  # Not JAX's IndivisibleError, nor "the checkpoint cannot be read" (a resume then called every
  # step damaged): the parameter, its size and the mesh axis, before anything is restored.
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
  transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
  llama_jax.load(tmp_path / "hf").save(str(tmp_path / "saved"))
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=8)  # 100 rows of the vocabulary do not split 8 ways
  for path in (tmp_path / "hf", tmp_path / "saved"):
    with pytest.raises(sharding.ConfigError, match=r"parameter \S+ \(.*\): its axis of 100 does not split "
                                                   r"over mesh.tensor=8"):
      llama_jax.load(path, mesh=mesh)


def test_training_recipes_load_init_from_onto_the_run_mesh(hf_dir):
  # train_and_evaluate loads config.init_from (and DPO/PPO their frozen models) through these two
  # entry points: both must hand the run's mesh and rules to the load, so no device holds it all.
  import ml_collections

  from llama_jax.align import recipe
  from llama_jax.train.loop import LanguageModel
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  rules = sharding.as_rules(sharding.DEFAULT_RULES)
  config = ml_collections.ConfigDict({"init_from": hf_dir})
  pretrained = LanguageModel().load_pretrained(config, mesh, rules)
  frozen = recipe.load_frozen_model(hf_dir, pretrained.config, mesh, rules, "init_from")
  for loaded in (pretrained, frozen):
    w1 = loaded.params["layers"]["block"]["feed_forward"]["w1"]
    assert isinstance(w1.sharding, jax.sharding.NamedSharding) and w1.sharding.mesh == mesh
    assert len(w1.sharding.device_set) == 8 and w1.addressable_shards[0].data.size < w1.size


def test_logits_refuses_more_tokens_than_the_context(hf_dir):
  model = llama_jax.load(hf_dir)  # a context of 64 positions: beyond it, positions never trained on
  with pytest.raises(ValueError, match="tokens has rows of 65 tokens but the model's context is 64 tokens"):
    model.logits(np.ones((1, 65), np.int32))
  assert model.logits(np.ones((1, 64), np.int32)).shape == (1, 64, 128)


def test_save_over_another_model_keeps_none_of_its_tokenizer_files(hf_dir, tmp_path):
  # A model without a tokenizer saved where one with a tokenizer was: the old tokenizer.json would
  # otherwise load as this model's.
  model = llama_jax.load(hf_dir)
  out = tmp_path / "out"
  model.save(str(out))
  (out / "tokenizer.json").write_text("{}")  # a previous model's
  model.save(str(out))
  assert not (out / "tokenizer.json").exists()
  again = llama_jax.load(str(out))
  assert again.tokenizer is None
  np.testing.assert_array_equal(again.logits(np.array([[1, 2, 3]])), model.logits(np.array([[1, 2, 3]])))


def test_save_and_export_refuse_a_folder_holding_something_else(hf_dir, tmp_path):
  """As the converters' --output: another format's model or other files are refused unless
  overwrite=True; a training workdir always (a model at its top would shadow its checkpoints)."""
  from llama_jax.convert import CheckpointError
  model = llama_jax.load(hf_dir)
  tokens = np.array([[1, 2, 3]])
  hf_copy = tmp_path / "hf"
  model.export_hf(str(hf_copy))
  with pytest.raises(CheckpointError, match=r"holds a Hugging Face checkpoint .*pass overwrite=True"):
    model.save(str(hf_copy))
  assert not (hf_copy / "params").exists()
  ours = tmp_path / "ours"
  model.save(str(ours))
  model.save(str(ours))  # over itself: the same format, fine
  with pytest.raises(CheckpointError, match=r"holds a llama_jax model"):
    model.export_hf(str(ours))
  (ours / "notes.txt").write_text("mine")
  with pytest.raises(CheckpointError, match=r"files a llama_jax model does not have \(notes.txt\)"):
    model.save(str(ours))
  model.save(str(ours), overwrite=True)
  assert (ours / "notes.txt").read_text() == "mine"
  np.testing.assert_array_equal(llama_jax.load(str(ours)).logits(tokens), model.logits(tokens))
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  for write in (model.save, model.export_hf):
    with pytest.raises(CheckpointError, match="is a training workdir"):
      write(str(workdir), overwrite=True)
  assert sorted(os.listdir(workdir)) == ["checkpoints"]
