"""The chunked training loss equals the whole-logits one, and never holds the logits whole."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax.config import ModelConfig
from llama_jax.model import init_params
from llama_jax.train.step import _loss_sums

# A vocabulary large enough for the logits to dominate the gradient's scratch memory.
CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=64)
B, T = 4, 64


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
          "segment_ids": np.zeros((B, T), np.int32),
          "loss_mask": (rng.random((B, T)) > 0.2).astype(np.float32)}


def _compiled_value_and_grad(cfg, params, batch, z_loss):
  def objective(p):
    total, count, nll = _loss_sums(p, cfg, batch, z_loss, False)
    return total, (count, nll)
  return jax.jit(jax.value_and_grad(objective, has_aux=True)).lower(params).compile()


@pytest.mark.slow
@pytest.mark.parametrize("tie,z_loss", [(False, 0.0), (True, 1e-2)])
def test_chunked_loss_equals_whole_logits_without_holding_them(tie, z_loss):
  cfg = CFG.replace(tie_embeddings=tie)
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  batch = _batch()
  whole = _compiled_value_and_grad(cfg, params, batch, z_loss)
  chunked = _compiled_value_and_grad(cfg.replace(loss_chunk_len=16), params, batch, z_loss)
  (total, (count, nll)), grads = whole(params)
  (c_total, (c_count, c_nll)), c_grads = chunked(params)
  assert float(c_count) == float(count)
  np.testing.assert_allclose(float(c_total), float(total), rtol=1e-6)
  np.testing.assert_allclose(float(c_nll), float(nll), rtol=1e-6)
  for (path, g), c in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(c_grads)):
    # another summation order: equal to float32 rounding relative to the gradient's scale
    np.testing.assert_allclose(c, g, rtol=1e-5, atol=1e-5 * np.abs(g).max(), err_msg=jax.tree_util.keystr(path))
  # XLA's accounting of scratch memory (measured untied: 11.4 MB whole, 5.7 MB in chunks of 16)
  logits_bytes = B * T * cfg.vocab_size * 4  # float32 (B, T, V)
  whole_scratch = whole.memory_analysis().temp_size_in_bytes
  chunked_scratch = chunked.memory_analysis().temp_size_in_bytes
  assert whole_scratch > logits_bytes  # the logits (and their gradient) are there whole...
  assert whole_scratch - chunked_scratch > logits_bytes, (whole_scratch, chunked_scratch)  # ...and go


def test_chunk_must_divide_the_sequence():
  params = nn.unbox(init_params(CFG, jax.random.key(0)))
  with pytest.raises(ValueError, match="loss_chunk_len"):
    jax.eval_shape(lambda p: _loss_sums(p, CFG.replace(loss_chunk_len=24), _batch(), 0.0, False), params)
