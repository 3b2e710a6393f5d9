"""The fused decode kernels (`kernels.matvec`, `kernels.decode_attention.rotary_cache_attention`,
`kernels.decode_block`), in Pallas' interpreter on the CPU: each computes what the model's XLA
path computes, to the compute dtype's precision, and a decode through them draws the same tokens."""

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import model as M
from llama_jax.config import ModelConfig
from llama_jax.generate import engine, generate_tokens, slots
from llama_jax.generate.generator import forced_batch_logits, forced_logits
from llama_jax.generate.cache import KVCache
from llama_jax.kernels import decode_attention, decode_block, matvec


def _normal(key, shape, scale=1.0):
  return (jax.random.normal(jax.random.key(key), shape) * scale).astype(jnp.bfloat16)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("form", ["plain", "norm", "residual", "gate_up"])
def test_matvec_matches_the_model_arithmetic(rows, form):
  d, n = 2048 if rows == 1 else 512, 64  # one row: the multiply-and-sum form (D a multiple of 1024)
  x, w = _normal(0, (rows, d), 4.0), _normal(1, (n, d), 0.03)
  kw = {"norm": dict(norm=1 + _normal(2, (d,), 0.1)), "residual": dict(residual=_normal(3, (rows, n))),
        "gate_up": dict(norm=1 + _normal(2, (d,), 0.1), gate_up=True), "plain": {}}[form]
  assert matvec.settings(rows, d).reduce == (rows == 1)
  want = matvec.reference(x, w, **kw).astype(jnp.float32)
  # One row: also summed at the end of the loop rather than at every step (`wide`).
  for wide in (False, True) if rows == 1 else (False,):
    got = matvec.matvec(x, w, chosen=matvec.settings(rows, d)._replace(wide=wide), **kw).astype(jnp.float32)
    assert got.shape == (rows, n // 2 if form == "gate_up" else n)
    # bf16 outputs of size ~1-5: a few units in the last place (the norm's rounding comes elsewhere).
    np.testing.assert_allclose(got, want, atol=0.04, rtol=0.02)
  if form in ("norm", "gate_up"):  # the norm is applied: x's RMS is 4, so without it the product is 4x
    unnormed = matvec.reference(x, w, gate_up=form == "gate_up").astype(jnp.float32)
    assert float(jnp.max(jnp.abs(unnormed))) > 3 * float(jnp.max(jnp.abs(want)))


def test_the_kernels_rms_norm_is_the_models():
  x, g = _normal(0, (3, 512)), _normal(1, (512,))
  cfg = ModelConfig(dim=512, n_layers=1, n_heads=4, vocab_size=8, dtype="bfloat16", norm_eps=1e-6)
  np.testing.assert_array_equal(matvec.rms_norm(x, g, 1e-6), M.RMSNorm(cfg).apply({"params": {"weight": g}}, x))


def test_matvec_refuses_what_it_cannot_tile():
  x = _normal(0, (1, 512))
  with pytest.raises(ValueError, match="output-major"):
    matvec.matvec(x, _normal(1, (256, 64)))
  with pytest.raises(ValueError, match="whole tiles of 512 inputs and 4 outputs"):
    matvec.matvec(x, _normal(1, (42, 512)))
  with pytest.raises(ValueError, match="1..16 rows"):
    matvec.matvec(_normal(0, (17, 512)), _normal(1, (64, 512)))
  with pytest.raises(ValueError, match="residual"):
    matvec.matvec(x, _normal(1, (64, 512)), residual=_normal(2, (1, 32)))
  assert not matvec.supported(1, 100, 64)


SCHEMES = {  # bits, group size (0: one group per output channel), symmetric
    "int8": (8, 0, True), "int8_zeros": (8, 0, False), "int8_g128": (8, 128, True),
    "int4_g128": (4, 128, True), "int4_g64_zeros": (4, 64, False)}


def _quantized(w, scheme: str):
  """w (N, D) quantized by round-to-nearest, in the decode layout (output-major integers)."""
  from llama_jax import projection
  from llama_jax.quantize.grid import Grid
  from llama_jax.quantize.rtn import quantize_weight
  qt = quantize_weight(w.T.astype(jnp.float32), Grid(*SCHEMES[scheme]), 1, name="w")
  return projection.transposed(qt)


@pytest.mark.parametrize("rows, scheme", [  # every scheme at one row; three rows of two (fast tier)
    *((1, scheme) for scheme in SCHEMES), (3, "int8"), (3, "int4_g128"),
    *(pytest.param(3, scheme, marks=pytest.mark.slow) for scheme in ("int8_zeros", "int8_g128", "int4_g64_zeros"))])
def test_quantized_matvec_matches_the_dequantized_product(rows, scheme):
  # The kernel reads the integers; the reference multiplies by the dequantized weight in float32
  # (as the model's per-group products accumulate). Zero points, scales per group and the int4
  # nibbles' order each change the answer by far more than the tolerance.
  d, n = 1024 if rows == 1 else 512, 64
  x, w = _normal(0, (rows, d), 4.0), _normal(1, (n, d), 0.03)
  qt = _quantized(w, scheme)
  assert qt.values.shape == (n, d // 2 if qt.bits == 4 else d)
  assert matvec.supported(rows, d, n, weight=matvec.Weight.of(qt))
  weight = matvec.Weight.of(qt)
  chosen = matvec.settings(rows, d, weight)
  wides = (False, True) if chosen.reduce else (False,)
  for kw in (dict(norm=1 + _normal(2, (d,), 0.1), gate_up=True), dict(residual=_normal(3, (rows, n)))):
    want = matvec.reference(x, qt, **kw).astype(jnp.float32)
    for wide in wides:
      got = matvec.matvec(x, qt, chosen=chosen._replace(wide=wide), **kw).astype(jnp.float32)
      np.testing.assert_allclose(got, want, atol=0.04, rtol=0.02)
  plain = matvec.reference(x, w).astype(jnp.float32)  # quantization itself moves the product
  assert float(jnp.max(jnp.abs(matvec.matvec(x, qt).astype(jnp.float32) - plain))) > 0


def test_quantized_matvec_refuses_what_it_cannot_tile():
  x = _normal(0, (1, 1024))
  qt = _quantized(_normal(1, (64, 1024)), "int4_g128")
  with pytest.raises(ValueError, match="output-major"):
    matvec.matvec(x, dataclasses.replace(qt, output_major=False))
  with pytest.raises(ValueError, match="scales"):  # (groups, outputs): the checkpoint's layout
    matvec.matvec(x, dataclasses.replace(qt, scales=qt.scales.T))
  odd = _quantized(_normal(1, (64, 960)), "int4_g64_zeros")  # 960 inputs: 15 groups of 64 -> steps of 64
  assert matvec.supported(1, 960, 64, weight=matvec.Weight.of(odd))
  assert matvec.settings(1, 1024, matvec.Weight(4, 96)) is None  # groups not a power of two
  assert matvec.settings(1, 5632, matvec.Weight(4, 5632)) is None  # int4 over a whole channel of 5,632


@pytest.mark.parametrize("rows, heads, kv_heads, length, positions", [
    (1, 8, 2, 128, [5]), (2, 8, 4, 96, [0, 95]), (3, 4, 4, 150, [70, 129, 149])])
def test_rotary_cache_attention_matches_the_model(rows, heads, kv_heads, length, positions):
  h = 64
  qkv = _normal(0, (rows, heads + 2 * kv_heads, h))
  k_cache, v_cache = _normal(1, (rows, kv_heads, length, h)), _normal(2, (rows, kv_heads, length, h))
  positions = jnp.asarray(positions, jnp.int32)
  sin, cos = M.rotary_tables(positions[:, None], ModelConfig(dim=h, n_heads=1))  # (B, 1, 1, H/2)
  out, k_new, v_new = decode_attention.rotary_cache_attention(
      qkv, sin[:, 0, 0], cos[:, 0, 0], positions, k_cache, v_cache, n_heads=heads, block_k=32)
  # The model's decode step: rotary, the cache write, masked attention over the whole cache.
  q, k, v = qkv[:, None, :heads], qkv[:, None, heads:heads + kv_heads], qkv[:, None, heads + kv_heads:]
  q, k = M.rotary(q, (sin, cos)), M.rotary(k, (sin, cos))
  cache = KVCache(k_cache, v_cache).write(k, v, positions[:, None])
  mask = M.attention_mask(positions[:, None], jnp.broadcast_to(jnp.arange(length), (rows, length)))
  want = M.xla_attention(q, cache.k, cache.v, mask, "BKSH")[:, 0]
  np.testing.assert_array_equal(k_new, cache.k)
  np.testing.assert_array_equal(v_new, cache.v)
  np.testing.assert_allclose(out.astype(jnp.float32), want.astype(jnp.float32), atol=0.02, rtol=0.02)


@pytest.mark.parametrize("rows, heads, kv_heads, length, positions, splits", [
    (2, 8, 2, 256, [200, 3], 3), (3, 4, 4, 150, [70, 129, 149], 5)])
def test_rotary_cache_attention_in_stretches_matches_one_program_a_row(rows, heads, kv_heads, length,
                                                                       positions, splits):
  # The cache's blocks dealt out over `splits` programs a row and KV head, joined by XLA after: the
  # same cache writes, the same attention to bf16 rounding (another order of the sums); a row whose
  # positions end before a stretch leaves it empty (row 1 of the first case: 3 positions); groups of
  # one query head (the second case) store one of the 16 rows Triton's dot pads them to.
  h = 64
  qkv = _normal(0, (rows, heads + 2 * kv_heads, h))
  k_cache, v_cache = _normal(1, (rows, kv_heads, length, h)), _normal(2, (rows, kv_heads, length, h))
  positions = jnp.asarray(positions, jnp.int32)
  sin, cos = (t[:, 0, 0] for t in M.rotary_tables(positions[:, None], ModelConfig(dim=h, n_heads=1)))
  run = lambda splits: decode_attention.rotary_cache_attention(  # noqa: E731
      qkv, sin, cos, positions, k_cache, v_cache, n_heads=heads, block_k=32, splits=splits)
  (want, k_want, v_want), (got, k_got, v_got) = run(1), run(splits)
  np.testing.assert_array_equal(k_got, k_want)
  np.testing.assert_array_equal(v_got, v_want)
  np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=4e-3, rtol=4e-3)
  with pytest.raises(ValueError, match="splits"):
    run(length // 32 + 2)


def test_rotary_cache_attention_writes_nothing_past_the_cache():
  # A position past the cache (a finished row) must not write outside it: the model's scatter
  # drops the write; the kernel masks its store.
  qkv = _normal(0, (1, 6, 32))
  k_cache, v_cache = _normal(1, (1, 2, 64, 32)), _normal(2, (1, 2, 64, 32))
  sin = cos = jnp.zeros((1, 16), jnp.float32)
  _, k_new, v_new = decode_attention.rotary_cache_attention(
      qkv, sin, cos, jnp.asarray([64], jnp.int32), k_cache, v_cache, n_heads=2)
  np.testing.assert_array_equal(k_new, k_cache)
  np.testing.assert_array_equal(v_new, v_cache)


LOWERING = """
import jax, jax.numpy as jnp
from llama_jax import projection
from llama_jax.kernels import decode_attention, matvec

def lowered(fn, *args):
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "triton" in text.lower()

# TinyLlama's four products at one row (w2's 5,632 inputs: Triton's dot), LLaMA-2-7B's w2, a batch.
for rows, d, n, form in [(1, 2048, 2560, "norm"), (1, 2048, 2048, "residual"), (1, 2048, 11264, "gate_up"),
                         (1, 5632, 2048, "residual"), (1, 11008, 4096, "residual"), (3, 512, 64, "norm")]:
  outputs = n // 2 if form == "gate_up" else n
  g = jnp.ones((d,), jnp.bfloat16)
  kw = {"norm": dict(norm=g), "gate_up": dict(norm=g, gate_up=True),
        "residual": dict(residual=jnp.zeros((rows, outputs), jnp.bfloat16))}[form]
  for wide in (False, True) if rows == 1 and d % 512 == 0 else (False,):
    chosen = matvec.settings(rows, d)._replace(wide=wide)
    lowered(lambda x, w: matvec.matvec(x, w, interpret=False, chosen=chosen, **kw),
            jnp.zeros((rows, d), jnp.bfloat16), jnp.zeros((n, d), jnp.bfloat16))
  print("lowered matvec", rows, d, n, form)

# Quantized: TinyLlama's products at int8 per channel and int4 in groups of 128, LLaMA-2-7B's w2,
# zero points, a batch of 3 (Triton's dot on the converted integers).
for rows, d, n, form, bits, gs, zeros in [
    (1, 2048, 2560, "norm", 8, 2048, False), (1, 2048, 11264, "gate_up", 4, 128, False),
    (1, 5632, 2048, "residual", 4, 128, False), (1, 11008, 4096, "residual", 8, 11008, False),
    (1, 11008, 4096, "residual", 4, 128, True), (3, 512, 64, "norm", 4, 64, True)]:
  outputs = n // 2 if form == "gate_up" else n
  g = jnp.ones((d,), jnp.bfloat16)
  kw = {"norm": dict(norm=g), "gate_up": dict(norm=g, gate_up=True),
        "residual": dict(residual=jnp.zeros((rows, outputs), jnp.bfloat16))}[form]
  dtype = jnp.uint8 if bits == 4 or zeros else jnp.int8
  groups = jnp.zeros((n, d // gs), jnp.float16)  # output-major: (outputs, groups)
  qt = projection.QuantizedTensor(jnp.zeros((n, d * bits // 8), dtype), groups,
                                  jnp.zeros((n, d // gs), jnp.uint8) if zeros else None, bits, gs,
                                  (d, n), 1, output_major=True)
  chosen = matvec.settings(rows, d, matvec.Weight.of(qt))
  for wide in (False, True) if chosen.reduce else (False,):
    lowered(lambda x, qt: matvec.matvec(x, qt, interpret=False, chosen=chosen._replace(wide=wide), **kw),
            jnp.zeros((rows, d), jnp.bfloat16), qt)
  print("lowered matvec", rows, d, n, form, bits)

for h, length in [(64, 384), (64, 2048), (128, 2048)]:
  cache = jnp.zeros((1, 2, length, h), jnp.bfloat16)
  half = jnp.zeros((1, h // 2), jnp.float32)
  lowered(lambda qkv, k, v: decode_attention.rotary_cache_attention(
      qkv, half, half, jnp.zeros((1,), jnp.int32), k, v, n_heads=8, interpret=False),
          jnp.zeros((1, 12, h), jnp.bfloat16), cache, cache)
  print("lowered attention", h, length)

# A batch of 16 rows.
cache = jnp.zeros((16, 4, 384, 64), jnp.bfloat16)
half = jnp.zeros((16, 32), jnp.float32)
lowered(lambda qkv, k, v: decode_attention.rotary_cache_attention(
    qkv, half, half, jnp.zeros((16,), jnp.int32), k, v, n_heads=32, interpret=False),
        jnp.zeros((16, 40, 64), jnp.bfloat16), cache, cache)
print("lowered attention", 16, 384)
# In stretches: 16 rows over 1,024 positions in 4, one row over 384 in 3 (TinyLlama's heads), one
# row of LLaMA-2-7B's (32 KV heads of 128) over 2,048 in 8.
for rows, kv_heads, h, length, splits in [(16, 4, 64, 1024, 4), (1, 4, 64, 384, 3), (1, 32, 128, 2048, 8)]:
  cache = jnp.zeros((rows, kv_heads, length, h), jnp.bfloat16)
  half = jnp.zeros((rows, h // 2), jnp.float32)
  lowered(lambda qkv, k, v: decode_attention.rotary_cache_attention(
      qkv, half, half, jnp.zeros((rows,), jnp.int32), k, v, n_heads=32, splits=splits, interpret=False),
          jnp.zeros((rows, 32 + 2 * kv_heads, h), jnp.bfloat16), cache, cache)
  print("lowered attention", rows, length, "splits", splits)
"""


@pytest.mark.slow
def test_the_kernels_lower_for_a_gpu():
  # Pallas' interpreter pads and clamps what Triton refuses (tiles whose sides are not powers of
  # two, ...); lowering for CUDA, which a CPU can do, runs Pallas' Triton lowering and its checks.
  # In a process of its own: it loads Triton's MLIR dialects, which the test processes do not need.
  proc = subprocess.run([sys.executable, "-c", LOWERING], capture_output=True, text=True, timeout=600,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("lowered matvec") == 12 and proc.stdout.count("lowered attention") == 7


@pytest.mark.slow
def test_the_mosaic_gpu_matvec_experiment_lowers_for_a_gpu():
  # benchmarks/mgpu_matvec.py (weight loads before PDL's wait; measured in session 15, BENCHMARKS.md)
  # runs on GPUs only; lowering it for CUDA runs Pallas' Mosaic GPU lowering (layouts, TMA's limits,
  # shared memory) and keeps it from rotting between calls. CI's JAX (0.10) lowered a barrier that
  # the GPUs' JAX (0.11) refused, so this is a check, not a guarantee.
  proc = subprocess.run([sys.executable, "benchmarks/mgpu_matvec.py", "--lower_only", "--chain", "2"],
                        capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("lowered") == 10 and proc.stdout.count("pdl=True") == 5


@pytest.mark.slow
def test_a_batch_step_needs_every_product_in_the_decode_layout():
  cfg = _tiny("pallas")
  layer = engine.prepare_params(cfg, nn.unbox(M.init_params(cfg, jax.random.key(0)))).layers[0]
  assert decode_block.batch_applies(cfg, layer)
  ffn = dict(layer["feed_forward"])
  w13 = ffn.pop("w13_t")  # as a layer whose w1 and w3 did not stack: kept apart, input-major
  unstacked = {**layer, "feed_forward": {**ffn, "w1": w13[:cfg.hidden_dim].T, "w3": w13[cfg.hidden_dim:].T}}
  assert not decode_block.batch_applies(cfg, unstacked)
  assert not decode_block.batch_applies(cfg.replace(dtype="float32"), layer)


@pytest.mark.slow
def test_heads_the_kernels_cannot_tile_keep_xla_blocks():
  assert [decode_attention.supported_head_dim(h) for h in (32, 64, 96, 128, 160)] == [True, True, False, True, False]
  cfg = ModelConfig(dim=768, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=256, max_seq_len=64,
                    ffn_hidden_dim=1024, dtype="bfloat16", decode_kernels="pallas")  # heads of 96
  layer = engine.prepare_params(cfg, nn.unbox(M.init_params(cfg, jax.random.key(0)))).layers[0]
  assert "wqkv_t" in layer["attention"] and not decode_block.applies(cfg, layer, 1)
  with pytest.raises(ValueError, match="power of two"):
    decode_attention.rotary_cache_attention(_normal(0, (1, 12, 96)), jnp.zeros((1, 48)), jnp.zeros((1, 48)),
                                            jnp.zeros((1,), jnp.int32), _normal(1, (1, 2, 64, 96)),
                                            _normal(2, (1, 2, 64, 96)), n_heads=8)


def _tiny(decode_kernels: str) -> ModelConfig:
  # The kernels' tiling: D, F and N*H multiples of 1024 or 256; heads of 128.
  return ModelConfig(dim=1024, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=256, max_seq_len=128,
                     ffn_hidden_dim=1280, dtype="bfloat16", decode_kernels=decode_kernels)


NEAR_TIE = 0.05  # logits this close may fall either way under the kernels' roundings (~0.02 here)


def _same_until_a_near_tie(got, want, want_logits) -> int:
  """How many tokens `got` and `want` share; asserts they agree up to the first step whose top two
  logits (of `want`'s run) are within NEAR_TIE, where the roundings may legitimately decide."""
  top = np.sort(np.asarray(want_logits, np.float32), axis=-1)[:, -2:]
  near = np.flatnonzero(top[:, 1] - top[:, 0] < NEAR_TIE)
  until = int(near[0]) if near.size else len(want)
  assert list(got[:until]) == list(want[:until]), (got, want, until)
  return until


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["", "int4_g128"])
def test_the_kernels_give_xla_logits_under_the_same_tokens(quantize):
  # Teacher-forced: both engines fed XLA's greedy tokens, so every step compares like with like.
  params = nn.unbox(M.init_params(_tiny("xla"), jax.random.key(0)))
  if quantize:  # every projection as integers: the kernels read them, XLA converts them
    from llama_jax.quantize.grid import Grid
    from llama_jax.quantize.layers import Options, quantize_params
    params, _ = quantize_params(_tiny("xla"), params, Grid(*SCHEMES[quantize]), Options("rtn"))
  prompt, steps = [5, 6, 7, 8, 9, 10, 11], 12
  reference = generate_tokens(_tiny("xla"), params, [prompt], steps)[0]
  logits = {}
  for kernels in ("xla", "pallas"):
    cfg = _tiny(kernels)
    ep = engine.prepare_params(cfg, params)
    assert decode_block.applies(cfg, ep.layers[0], 1) and not decode_block.applies(cfg, ep.layers[0], 2)
    logits[kernels] = forced_logits(cfg, params, prompt, reference)
  diff = np.abs(logits["pallas"] - logits["xla"])
  assert 0 < diff.max() < 0.03 * np.abs(logits["xla"]).max(), diff.max()  # the kernels ran, and agree


@pytest.mark.slow  # 10 s at the least (the kernels' own tests are in the fast tier)
@pytest.mark.parametrize("batch_kernels, quantize", [
    ((), ""), (tuple(decode_block.BATCH_KERNELS), ""), (("wo_t", "w13_t"), ""),
    (tuple(decode_block.BATCH_KERNELS), "int4_g128")])
def test_a_batch_step_runs_the_attention_kernel_between_xla_matmuls(monkeypatch, batch_kernels, quantize):
  # Rows of different lengths, teacher-forced on XLA's tokens: each row's logits through
  # `decode_block.batch_block` (XLA's matmuls, the fused attention kernel; some products as
  # `matvec` kernels if BATCH_KERNELS says so, plain weights only) against XLA's blocks.
  monkeypatch.setattr(decode_block, "BATCH_KERNELS", frozenset(batch_kernels))
  products = []
  original_matvec = matvec.matvec
  monkeypatch.setattr(matvec, "matvec", lambda x, w, **k: products.append(w.shape) or original_matvec(x, w, **k))
  params = nn.unbox(M.init_params(_tiny("xla"), jax.random.key(2)))
  if quantize:  # every projection as integers: XLA's quantized GEMMs around the attention kernel
    from llama_jax.quantize.grid import Grid
    from llama_jax.quantize.layers import Options, quantize_params
    params, _ = quantize_params(_tiny("xla"), params, Grid(*SCHEMES[quantize]), Options("rtn"))
  prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [9, 8, 7, 6, 5, 4, 3, 2, 1, 12, 13]]
  reference = generate_tokens(_tiny("xla"), params, prompts, 6)
  ep = engine.prepare_params(_tiny("pallas"), params)
  assert engine.fused_attention(_tiny("pallas"), ep) and not engine.fused_blocks(_tiny("pallas"), ep, 3)
  assert not engine.fused_attention(_tiny("xla"), ep)
  calls = []
  original = decode_block.batch_block
  monkeypatch.setattr(decode_block, "batch_block", lambda *a, **k: calls.append(a[2].shape) or original(*a, **k))
  logits = {k: forced_batch_logits(_tiny(k), params, prompts, reference) for k in ("xla", "pallas")}
  assert calls and set(calls) == {(3, _tiny("xla").dim)}
  cfg = _tiny("xla")
  widths = {"wo_t": (cfg.dim, cfg.n_heads * cfg.head_dim), "w13_t": (2 * cfg.hidden_dim, cfg.dim),
            "w2_t": (cfg.dim, cfg.hidden_dim)}
  assert set(products) == (set() if quantize else {widths[k] for k in batch_kernels})
  diff = np.abs(logits["pallas"] - logits["xla"])
  assert 0 < diff.max() < 0.03 * np.abs(logits["xla"]).max(), diff.max()  # the kernel ran, and agrees
  # Each row as it would be alone: the ragged positions were each row's own.
  alone = forced_logits(_tiny("xla"), params, prompts[1], reference[1])
  assert np.abs(logits["pallas"][1] - alone).max() < 0.03 * np.abs(alone).max()


def test_attention_splits_deal_out_whole_blocks_when_programs_are_few(monkeypatch):
  # The default: stretches of 128 positions below 64 (row, KV head) programs, one program from 64.
  assert [decode_block.attention_splits(384, 64, p) for p in (1, 4, 32, 63, 64, 256)] == [3, 3, 3, 3, 1, 1]
  monkeypatch.setattr(decode_block, "ATTENTION_SPLIT", 0)
  assert decode_block.attention_splits(1024, 64) == 1
  monkeypatch.setattr(decode_block, "ATTENTION_SPLIT", 256)
  # The kernel's blocks: 128 positions up to 1,024, 256 beyond (heads of 64).
  assert [decode_block.attention_splits(n, 64) for n in (200, 384, 1024, 2048)] == [1, 2, 4, 8]
  monkeypatch.setattr(decode_block, "ATTENTION_SPLIT", 64)
  assert decode_block.attention_splits(384, 64) == 3  # never less than a block a stretch
  monkeypatch.setattr(decode_block, "ATTENTION_SPLIT", 200)  # not whole blocks: 1 a stretch, 8 stretches
  assert decode_block.attention_splits(1024, 64) == 8


@pytest.mark.slow  # the kernel's own test of stretches is in the fast tier
def test_a_step_reading_the_cache_in_stretches_gives_the_models_logits(monkeypatch):
  params = nn.unbox(M.init_params(_tiny("xla"), jax.random.key(3)))
  prompt, tokens = list(range(5, 35)), [40, 41, 42, 43, 44, 45]  # a cache of 36: 3 blocks of 16
  monkeypatch.setattr(decode_attention, "rotary_block", lambda length, head_dim=64: 16)
  want = forced_logits(_tiny("pallas"), params, prompt, tokens)
  monkeypatch.setattr(decode_block, "ATTENTION_SPLIT", 16)
  assert decode_block.attention_splits(36, 128) == 3
  got = forced_logits(_tiny("pallas"), params, prompt, tokens)
  assert 0 < np.abs(got - want).max() < 0.03 * np.abs(want).max()  # the stretches ran, and agree


def test_slots_whose_attention_reads_each_length_compile_no_windows():
  params = nn.unbox(M.init_params(_tiny("xla"), jax.random.key(1)))
  with_kernels = slots.SlotEngine(_tiny("pallas"), params, max_batch=4, steps=4, min_attend=16,
                                  decode_attention="xla")
  assert with_kernels.reads_own_lengths and not with_kernels.windowed(4)
  xla = slots.SlotEngine(_tiny("xla"), params, max_batch=4, steps=4, min_attend=16, decode_attention="xla")
  assert not xla.reads_own_lengths and xla.windowed(4)


@pytest.mark.slow
@pytest.mark.optimised  # decode steps through Pallas' interpreter: long loops (conftest)
def test_a_decode_through_the_kernels_draws_xla_tokens():
  params = nn.unbox(M.init_params(_tiny("xla"), jax.random.key(0)))
  runs = {kernels: generate_tokens(_tiny(kernels), engine.prepare_params(_tiny(kernels), params),
                                   [[5, 6, 7, 8, 9, 10, 11]], 24, return_logits=True)[0]
          for kernels in ("xla", "pallas")}
  (xla_tokens, xla_logits), (pallas_tokens, pallas_logits) = runs["xla"], runs["pallas"]
  same = _same_until_a_near_tie(pallas_tokens, xla_tokens, xla_logits)
  assert same >= 1 and float(np.max(np.abs(pallas_logits[1:same] - xla_logits[1:same]))) > 0


def test_the_kernels_need_one_device():
  devices = jax.devices()
  if len(devices) < 2:
    pytest.fail("the test suite runs with several emulated CPU devices (conftest)")
  mesh = jax.sharding.Mesh(np.array(devices[:2]), ("data",))
  assert not engine.decode_kernels(_tiny("auto"), mesh)
  assert not engine.decode_kernels(_tiny("auto"), None)  # "auto" is XLA off a GPU
  assert engine.decode_kernels(_tiny("pallas"), None)
  with pytest.raises(ValueError, match="one device"):
    engine.decode_kernels(_tiny("pallas"), mesh)


def test_the_decode_layout_is_output_major():
  cfg = _tiny("xla")
  layer = engine.prepare_params(cfg, nn.unbox(M.init_params(cfg, jax.random.key(0)))).layers[0]
  d, f, h = cfg.dim, cfg.hidden_dim, cfg.head_dim
  assert layer["attention"]["wqkv_t"].shape == ((cfg.n_heads + 2 * cfg.n_kv_heads) * h, d)
  assert layer["attention"]["wo_t"].shape == (d, cfg.n_heads * h)
  assert layer["feed_forward"]["w13_t"].shape == (2 * f, d)
  assert layer["feed_forward"]["w2_t"].shape == (d, f)


@pytest.mark.slow
@pytest.mark.optimised  # decode steps through Pallas' interpreter: long loops (conftest)
def test_a_slot_engine_at_one_row_decodes_through_the_kernels(monkeypatch):
  # The server's path: one live slot, calls of one row (the window of its filled positions).
  cfg = _tiny("pallas")
  params = nn.unbox(M.init_params(cfg, jax.random.key(1)))
  blocks = []
  original = decode_block.block
  monkeypatch.setattr(decode_block, "block", lambda *a, **k: blocks.append(a[2].shape) or original(*a, **k))
  eng = slots.SlotEngine(cfg, params, max_batch=4, steps=4, min_attend=16)
  prompt = [1, 9, 33, 7, 120, 5]
  state, calls = eng.prefill_into(eng.init(), [prompt], [0], [(0.0, 0, 1.0)], [0])
  out = [int(calls[0][1].tokens[0, 0])]
  for _ in range(3):
    state, drawn = eng.generate(state, rows=1, need=len(prompt) + len(out) + eng.steps, greedy=True)
    out += np.asarray(drawn.tokens)[0, :eng.steps].tolist()
  assert blocks and all(shape == (1, cfg.dim) for shape in blocks)
  [(want, want_logits)] = generate_tokens(_tiny("xla"), params, [prompt], len(out), return_logits=True)
  assert _same_until_a_near_tie(out, want, want_logits) >= 1
