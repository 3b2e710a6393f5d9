"""llama_jax.load onto a mesh: parameters go straight into their shards, never whole on one device."""

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
