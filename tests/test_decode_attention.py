"""The ragged decode-attention kernel (`kernels.decode_attention`, in Pallas' interpreter on the
CPU): each row attends over its own filled positions exactly as masked XLA attention does, and a
slot engine that uses it decodes what `generate_tokens` decodes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import model as M
from llama_jax.config import ModelConfig
from llama_jax.generate import generate_tokens, slots
from llama_jax.kernels import decode_attention as kernel


def _inputs(b, n, kv, s, h, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, 1, n, h)), dtype)
  k = jnp.asarray(rng.normal(size=(b, kv, s, h)), dtype)
  v = jnp.asarray(rng.normal(size=(b, kv, s, h)), dtype)
  return q, k, v


@pytest.mark.parametrize("s, lengths", [(48, [1, 48, 17, 30]), (192, [192, 5, 64, 129])])
def test_each_row_attends_over_its_own_length(s, lengths):
  q, k, v = _inputs(4, 8, 2, s, 16, jnp.float32)
  lengths = jnp.asarray(lengths)
  out = kernel.ragged_decode_attention(q, k, v, lengths)
  np.testing.assert_allclose(out, kernel.reference(q, k, v, lengths), rtol=1e-5, atol=1e-5)
  # And the model's own masked attention over the same cache agrees (positions = length - 1).
  mask = M.attention_mask((lengths - 1)[:, None], jnp.broadcast_to(jnp.arange(s), (4, s)))
  np.testing.assert_allclose(out, M.xla_attention(q, k, v, mask, "BKSH"), rtol=1e-5, atol=1e-5)
  # Past a row's length: stale entries in its last stretch are masked out, and the stretches after
  # it are never loaded (NaN there would show).
  split = next(n for n in kernel.SPLIT_LENGTHS if s % n == 0)
  positions = jnp.arange(s)[None, None, :, None]
  past = positions >= lengths[:, None, None, None]
  unread = positions >= (-(-lengths // split) * split)[:, None, None, None]
  garbage = lambda x: jnp.where(unread, jnp.nan, jnp.where(past, 1e4, x))  # noqa: E731
  np.testing.assert_array_equal(kernel.ragged_decode_attention(q, garbage(k), garbage(v), lengths), out)


def test_bfloat16_matches_the_float32_reference():
  q, k, v = _inputs(2, 4, 4, 64, 16, jnp.bfloat16, seed=3)  # no grouping (one query head a KV head)
  lengths = jnp.asarray([64, 9])
  out = kernel.ragged_decode_attention(q, k, v, lengths)
  assert out.dtype == jnp.bfloat16
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  np.testing.assert_allclose(out.astype(jnp.float32), kernel.reference(*f32, lengths), atol=2e-2)


def test_shapes_it_cannot_take_are_refused():
  q, k, v = _inputs(1, 4, 2, 40, 16, jnp.float32)
  assert not kernel.supported(40) and kernel.supported(48)
  with pytest.raises(ValueError, match="multiple of 16"):
    kernel.ragged_decode_attention(q, k, v, jnp.asarray([3]))
  q2 = jnp.concatenate([q, q], axis=1)
  with pytest.raises(ValueError, match="one query a row"):
    kernel.ragged_decode_attention(q2, k[:, :, :32], v[:, :, :32], jnp.asarray([3]))


TINY = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=320, multiple_of=16,
                   max_seq_len=64)


@pytest.mark.slow
def test_a_slot_engine_on_the_kernel_decodes_what_generate_tokens_decodes(monkeypatch):
  params = nn.unbox(M.init_params(TINY, jax.random.key(0)))
  traced = []
  original = kernel.ragged_decode_attention
  monkeypatch.setattr(kernel, "ragged_decode_attention",
                      lambda *a, **k: traced.append(a[1].shape) or original(*a, **k))
  # 8 slots, calls of the leading 4: the rows' part of the cache copied out and written back
  eng = slots.SlotEngine(TINY, params, max_batch=8, steps=3, min_attend=16, decode_attention="pallas")
  assert eng.cfg.decode_attention == "pallas"
  assert slots.SlotEngine(TINY, params, max_batch=4).cfg.decode_attention == "xla"  # "auto" on a CPU
  two = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tensor",))  # (conftest: 8 CPU devices)
  assert two.devices.size == 2
  with pytest.raises(ValueError, match="one device"):
    slots.resolve_decode_attention("pallas", two)
  assert slots.resolve_decode_attention("auto", two) == "xla"
  rng = np.random.default_rng(1)
  prompts = [[1] + rng.integers(3, TINY.vocab_size, n - 1).tolist() for n in (5, 20, 11)]
  state, calls = eng.prefill_into(eng.init(), prompts, [0, 0, 0], [(0.0, 0, 1.0)] * 3, [0, 1, 2])
  out = [[] for _ in prompts]
  for chosen, drawn in calls:
    for row, i in enumerate(chosen):
      out[i].append(int(drawn.tokens[row, 0]))
  for _ in range(4):  # the kernel gets the whole cache (no windows: it reads each slot's own length)
    need = max(len(p) + len(o) for p, o in zip(prompts, out)) + eng.steps
    state, drawn = eng.generate(state, rows=4, need=need)
    tokens = np.asarray(drawn.tokens)
    for i in range(3):
      out[i] += tokens[i, :eng.steps].tolist()
  assert traced and all(shape[0] == 4 and shape[2] == eng.cache_len for shape in traced)
  assert out == generate_tokens(TINY, params, prompts, len(out[0]))
