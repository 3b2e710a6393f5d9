"""The chunked training loss equals the whole-logits one, and never holds the logits whole."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import ModelConfig
from llama_jax.model import init_params
from llama_jax.train_step import _loss_sums

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=64)


def _batch(b=4, t=64, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (b, t + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "segment_ids": np.zeros((b, t), np.int32),
          "loss_mask": (rng.random((b, t)) > 0.2).astype(np.float32)}


def _value_and_grad(cfg, params, batch, z_loss):
  def objective(p):
    total, count, nll = _loss_sums(p, cfg, batch, z_loss, False)
    return total, (count, nll)
  return jax.jit(jax.value_and_grad(objective, has_aux=True))(params)


@pytest.mark.parametrize("tie,z_loss", [(False, 0.0), (True, 1e-2)])
def test_chunked_loss_and_gradients_equal_whole_logits(tie, z_loss):
  cfg = CFG.replace(tie_embeddings=tie)
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  batch = _batch()
  (total, (count, nll)), grads = _value_and_grad(cfg, params, batch, z_loss)
  (c_total, (c_count, c_nll)), c_grads = _value_and_grad(cfg.replace(loss_chunk_len=16), params, batch, z_loss)
  assert float(c_count) == float(count)
  np.testing.assert_allclose(float(c_total), float(total), rtol=1e-6)
  np.testing.assert_allclose(float(c_nll), float(nll), rtol=1e-6)
  for (path, g), c in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(c_grads)):
    # another summation order: equal to float32 rounding relative to the gradient's scale
    np.testing.assert_allclose(c, g, rtol=1e-5, atol=1e-5 * np.abs(g).max(), err_msg=jax.tree_util.keystr(path))


def test_chunked_loss_needs_less_scratch_than_the_logits():
  # XLA's accounting of the compiled gradient's scratch memory, with a vocabulary large enough
  # for the logits to dominate it (measured: 11.4 MB whole, 5.7 MB in chunks of 16)
  cfg = CFG.replace(vocab_size=4096)
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  batch = _batch()

  def scratch(cfg):
    grad = jax.jit(jax.grad(lambda p: _loss_sums(p, cfg, batch, 0.0, False)[0]))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = 4 * 64 * cfg.vocab_size * 4  # float32 (B, T, V)
  whole, chunked = scratch(cfg), scratch(cfg.replace(loss_chunk_len=16))
  assert whole > logits_bytes  # the logits (and their gradient) are there whole...
  assert whole - chunked > logits_bytes, (whole, chunked)  # ...and chunking removes them


def test_chunk_must_divide_the_sequence():
  params = nn.unbox(init_params(CFG, jax.random.key(0)))
  with pytest.raises(ValueError, match="loss_chunk_len"):
    _loss_sums(params, CFG.replace(loss_chunk_len=24), _batch(), 0.0, False)
