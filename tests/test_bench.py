"""The benchmarks' own behaviour (their numbers come from GPUs; see BENCHMARKS.md)."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from llama_jax import model as model_lib
from llama_jax.bench import decode
from llama_jax.config import ModelConfig, to_config_dict

TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64)


def _config():
  return ml_collections.ConfigDict(dict(model=to_config_dict(TINY)))


@pytest.mark.slow
def test_decode_bench_makes_weights_without_initialising_the_model(monkeypatch):
  # Random weights straight in the engine's layout: the Flax initialisation of the whole stacked
  # model (what made a 1.1B decode benchmark take a minute before it timed anything) never runs.
  real = model_lib.init_params

  def shapes_only(cfg, rng):  # under jax.eval_shape (for the shapes) the key is abstract
    if not isinstance(rng, jax.core.Tracer):
      pytest.fail("the model was initialised for real")
    return real(cfg, rng)

  model_lib.param_shapes.cache_clear()
  monkeypatch.setattr(model_lib, "init_params", shapes_only)
  result = decode.bench_decode(_config(), batch_size=2, prompt_len=8, new_tokens=4, repeats=1)
  assert result["new_tokens"] == 4 and result["decode_tokens_per_s"] > 0


def test_decode_bench_past_the_context_is_a_clear_error():
  with pytest.raises(ValueError, match="does not fit the model's context of 64 tokens"):
    decode.bench_decode(_config(), batch_size=1, prompt_len=40, new_tokens=40, repeats=1)


@pytest.mark.slow
def test_train_variants_runs_each_variant_in_its_own_process_and_names_a_missing_constant():
  # benchmarks/train_variants.py: the A/B driver of training experiments (module constants set
  # before the benchmark). A constant that does not exist must fail loudly, not measure the base.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "benchmarks/train_variants.py", "--rounds", "1",
       "--variants", "base;model.NO_SUCH_CONSTANT=1", "--", "--config", "configs/tiny.py",
       "--steps", "2", "--warmup", "1", "--config.batch_size=8", "--config.seq_len=32"],
      capture_output=True, text=True, timeout=300, cwd=root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  base, missing = (json.loads(line) for line in proc.stdout.strip().splitlines())
  assert base["variant"] == "base" and base.get("tokens_per_s", 0) > 0, base
  assert base["batch_size"] == 8  # a row per device of the tests' eight
  assert missing["variant"] == "model.NO_SUCH_CONSTANT=1"
  assert "has no NO_SUCH_CONSTANT" in missing["error"]
