"""Every config the project ships loads and passes train.py's checks before any work (the model's
own, the batch over the mesh, the sequence length), on the tests' eight emulated devices."""

import glob
import os

import pytest

from llama_jax import sharding
from llama_jax.sharding import ConfigError
from llama_jax.config import ModelConfig
from llama_jax.train.cli import load_config
from llama_jax.train.loop import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not p.endswith("__init__.py"))


def test_the_configs_are_found():
  assert {"configs/default.py", "configs/tinyllama_1b.py", "configs/llama2_7b.py"} <= set(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS)
def test_a_shipped_config_passes_the_checks_before_training(path, monkeypatch):
  monkeypatch.chdir(REPO)
  config = load_config(path)
  model = ModelConfig.from_dict(config.model)
  validate(config, model, sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor))


def test_a_mesh_whose_batch_rows_processes_would_share_is_refused(monkeypatch):
  # As two processes whose devices all hold every row (tensor parallelism across hosts): each would
  # feed its own data into the same rows. Here one process holds all eight devices, so a count of
  # two processes stands for that layout.
  monkeypatch.chdir(REPO)
  config = load_config("configs/default.py")
  model = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  validate(config, model, mesh)
  monkeypatch.setattr("jax.process_count", lambda: 2)
  with pytest.raises(ConfigError, match="not a share of its own"):
    validate(config, model, mesh)


@pytest.mark.parametrize("recipe", ["dpo", "ppo"])
def test_a_recipe_without_its_config_section_is_one_error(recipe, monkeypatch):
  from llama_jax.align import get_recipe
  monkeypatch.chdir(REPO)
  config = load_config("configs/reward.py")
  config.recipe = recipe
  with pytest.raises(ConfigError, match=f"config.{recipe} section: start from configs/{recipe}.py"):
    get_recipe(config)


def test_retired_model_fields_in_saved_configs_are_dropped_with_a_warning(caplog):
  # model_config.json files written while model.norm_impl / model.swiglu_impl were fields (session
  # 15's kernels) still load; any other unknown key is still an error.
  import logging
  saved = dict(ModelConfig(dim=64, n_layers=2, n_heads=8).to_dict(), norm_impl="pallas", swiglu_impl="xla")
  with caplog.at_level(logging.WARNING, logger="llama_jax"):
    assert ModelConfig.from_dict(saved) == ModelConfig(dim=64, n_layers=2, n_heads=8)
  assert sorted(r.getMessage().split(" ")[0] for r in caplog.records) == ["model.norm_impl", "model.swiglu_impl"]
  with pytest.raises(ValueError, match="unknown model config keys: no_such_field"):
    ModelConfig.from_dict(dict(saved, no_such_field=1))
