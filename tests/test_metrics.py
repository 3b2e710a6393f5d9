"""MFU's FLOP count and the device table, against what the metrics docstring states; the event file."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax.config import ModelConfig, preset
from llama_jax.model import param_shapes
from llama_jax.train import metrics


@pytest.mark.parametrize("cfg", [
    ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=16),
    ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=97, multiple_of=16, tie_embeddings=True),
    preset("tinyllama_1b"),
])
def test_flops_per_token_is_six_n_plus_six_l_t_d(cfg):
  # N counted from the parameter shapes: every matrix but the embedding table (a lookup), the output
  # head included; RMSNorm weights are vectors, not matmul weights.
  shapes = nn.unbox(param_shapes(cfg))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  n = sum(int(np.prod(leaf.shape)) for path, leaf in flat
          if path[-1].key not in ("tok_embeddings", "weight"))
  if cfg.tie_embeddings:
    n += cfg.vocab_size * cfg.dim  # the tied head is a matmul too
  t = 128
  expected = 6 * n + 6 * cfg.n_layers * t * cfg.dim
  np.testing.assert_allclose(metrics.flops_per_token(cfg, t), expected, rtol=1e-3)
  # A frozen base (LoRA): forward and input gradients only, 4 per weight; attention unchanged.
  np.testing.assert_allclose(metrics.flops_per_token(cfg, t, frozen_weights=True),
                             4 * n + 6 * cfg.n_layers * t * cfg.dim, rtol=1e-3)


class _Device:
  def __init__(self, kind):
    self.device_kind = kind


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("cpu", None),
])
def test_peak_flops_tells_the_h100_variants_apart(kind, peak):
  assert metrics.peak_flops(_Device(kind), "bfloat16") == peak


def test_step_timer_leaves_out_evaluation_but_keeps_the_steps_before_it():
  # Steps 1-3 take 1 s each, an evaluation 100 s, steps 4-5 1 s each: 1 s a step, not 5 / 2.
  now = [0.0]
  timer = metrics.StepTimer(clock=lambda: now[0])
  timer.start()
  for _ in range(3):
    now[0] += 1.0
    timer.count_step()
  with timer.paused():
    now[0] += 100.0
  for _ in range(2):
    now[0] += 1.0
    timer.count_step()
  assert timer.lap() == pytest.approx(1.0)
  now[0] += 2.0
  timer.count_step()
  timer.count_step()
  assert timer.lap() == pytest.approx(1.0)  # the next window starts where this one ended


def test_dpo_and_reward_flops_count_a_frozen_lora_base_at_four_per_weight():
  # With config.lora the policy's (or backbone's) weights get no gradients: 2 FLOPs a weight less.
  from configs import dpo_tiny, reward_tiny
  from llama_jax.align.dpo import DPO
  from llama_jax.align.reward import RewardRecipe
  from llama_jax.config import ModelConfig
  for module, recipe, t, head in ((dpo_tiny, DPO(), 0, False), (reward_tiny, RewardRecipe(), 1, True)):
    config = module.get_config()
    cfg = ModelConfig.from_dict(config.model)
    tokens, full = recipe.throughput(config, cfg)
    config.lora.rank = 4
    same_tokens, lora = recipe.throughput(config, cfg)
    seq = config.seq_len + t
    saved = metrics.flops_per_token(cfg, seq) - metrics.flops_per_token(cfg, seq, frozen_weights=True)
    if head:  # a reward model has no output head
      saved -= 2 * cfg.vocab_size * cfg.dim
    assert same_tokens == tokens and saved > 0
    np.testing.assert_allclose(full - lora, saved * tokens, rtol=1e-9)
  config = dpo_tiny.get_config()
  cfg = ModelConfig.from_dict(config.model)
  tokens, full = DPO().throughput(config, cfg)
  np.testing.assert_allclose(full, metrics.flops_per_token(cfg, config.seq_len) * tokens * 8 / 6, rtol=1e-9)


@pytest.mark.slow
def test_the_event_file_does_not_import_pytorch(tmp_path):
  """tensorboardX's package imports torch when installed (~2.5 s of every train.py start): the event
  file is written without it, and torch still imports afterwards."""
  script = ("import sys; from llama_jax.train import metrics; "
            f"f = metrics._EventFile({str(tmp_path)!r}, 1); f.write(1, {{'loss': 1.0}}); f.close(); "
            "print('torch' in sys.modules); import torch; print(torch.ones(2).sum().item())")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["False", "2.0"]
  assert any(name.startswith("events") for name in os.listdir(tmp_path))
