"""Every config the project ships loads and passes train.py's checks before any work (the model's
own, the batch over the mesh, the sequence length), on the tests' eight emulated devices."""

import glob
import os

import pytest

from llama_jax import sharding
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
