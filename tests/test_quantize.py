"""Weight-only quantization: the storage format against a numpy transcription of its layout, the
quantized matmul against the dequantized weight, GPTQ's solver against a plain numpy transcription
of the reference `gptq.py` (Frantar et al. 2022), GPTQ against round-to-nearest on the same
calibration data, quantized checkpoints through `llama_jax.load`, the engine and the command lines."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import train_word_tokenizer

import llama_jax
from llama_jax import checkpoint, projection, sharding
from llama_jax import model as M
from llama_jax.config import ModelConfig
from llama_jax.generate import engine, generate_tokens
from llama_jax.quantize import __main__ as quantize_cli
from llama_jax.quantize import calibration, rtn
from llama_jax.quantize.gptq import gptq
from llama_jax.quantize.grid import Grid
from llama_jax.quantize.layers import Options, quantize_params

# Every projection 64 -> 64 but wk/wv (grouped-query, 64 -> 32): few matrix shapes, so few
# compilations of the solver; groups of 32 divide every width.
TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, ffn_hidden_dim=64,
                   max_seq_len=64)


@pytest.fixture(scope="module")
def params():
  return nn.unbox(M.init_params(TINY, jax.random.key(0)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, params):
  """A float model with a tokenizer, saved as our own checkpoint; and a calibration text."""
  root = tmp_path_factory.mktemp("quant")
  tok = train_word_tokenizer(root, TINY.vocab_size)
  checkpoint.save_model(str(root / "float"), TINY, params, str(tok))
  return root


TOKENS = np.random.default_rng(0).integers(3, TINY.vocab_size, (2, 17))


# --- the storage format

def _layout_reference(q, group_size):
  """The documented int4 layout, written out in numpy: byte r of group g holds row g*gs + r in its
  low nibble and row g*gs + gs/2 + r in its high nibble."""
  k, o = q.shape
  out = np.zeros((k // 2, o), np.uint8)
  half = group_size // 2
  for g in range(k // group_size):
    for r in range(half):
      out[g * half + r] = q[g * group_size + r] | (q[g * group_size + half + r] << 4)
  return out


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_packs_two_a_byte_and_unpacks_exactly(symmetric):
  rng = np.random.default_rng(0)
  k, o, gs = 64, 24, 16
  q = rng.integers(0, 16, (3, k, o)).astype(np.uint8)  # three stacked layers
  scales = rng.uniform(0.5, 2.0, (3, k // gs, o)).astype(np.float16)
  zeros = None if symmetric else rng.integers(0, 16, (3, k // gs, o)).astype(np.uint8)
  qt = projection.pack(q, scales, zeros, bits=4, group_size=gs, shape=(k, o), n_in=1)
  assert qt.values.dtype == jnp.uint8 and qt.values.shape == (3, k // 2, o)
  for layer in range(3):
    np.testing.assert_array_equal(np.asarray(qt.values[layer]), _layout_reference(q[layer], gs))
  zero = np.full((3, k // gs, o), 8) if symmetric else zeros
  want = (q.astype(np.float32) - np.repeat(zero, gs, axis=1)) * np.repeat(scales.astype(np.float32), gs, axis=1)
  np.testing.assert_array_equal(np.asarray(projection.dequantize(qt)), want)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_values_round_trip(symmetric):
  rng = np.random.default_rng(1)
  q = rng.integers(0, 256, (40, 8)).astype(np.float32)
  scales = np.full((1, 8), 0.5, np.float16)
  zeros = None if symmetric else rng.integers(0, 256, (1, 8)).astype(np.uint8)
  qt = projection.pack(q, scales, zeros, bits=8, group_size=40, shape=(40, 8), n_in=1)
  assert qt.values.dtype == (jnp.int8 if symmetric else jnp.uint8)
  zero = 128 if symmetric else zeros.astype(np.float32)
  np.testing.assert_array_equal(np.asarray(projection.dequantize(qt)), (q - zero) * 0.5)


@pytest.mark.parametrize("bits, group_size, symmetric", [(8, 0, True), (8, 16, False), (4, 16, True),
                                                         (4, 32, False)])
@pytest.mark.parametrize("tokens", [1, 3, 40])  # fewer than a group (decoding) and more (prefill)
@pytest.mark.parametrize("pinned", [True, False])  # the CPU's formulations, and the GPU's
def test_quantized_matmul_equals_the_dequantized_weight(bits, group_size, symmetric, tokens, pinned,
                                                        monkeypatch):
  monkeypatch.setattr(projection, "_pins_conversion", lambda: pinned)
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(4, 16, 64)) * 0.05, jnp.float32)  # wo-like: (N, H) -> D
  qt = rtn.quantize_weight(w, Grid(bits, group_size, symmetric), n_in=2)
  x = jnp.asarray(rng.normal(size=(1, tokens, 4, 16)), jnp.float32)
  ours = projection.project("BTNH,NHD->BTD", x, qt, jnp.float32)
  ref = jnp.einsum("BTNH,NHD->BTD", x, projection.dequantize(qt), precision="highest")
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # The engine's output-major decode layout (`projection.transposed`): the same weight, the same
  # product, with its letters (out, in) as the engine names them.
  t = projection.transposed(qt)
  assert t.output_major and t.values.shape[0] == 64 and t.scales.shape == (64, qt.n_groups)
  np.testing.assert_array_equal(np.asarray(projection.dequantize(t)), np.asarray(projection.dequantize(qt)).reshape(64, 64))
  ours_t = projection.project("BTF,DF->BTD", x.reshape(1, tokens, 64), t, jnp.float32)
  np.testing.assert_allclose(np.asarray(ours_t), np.asarray(ref), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="decode layout"):
    projection.describe({"wo": t})  # an engine's layout is not saved as a checkpoint
  # nor joined or placed as the checkpoint's layout is (the engine does both before transposing)
  assert not projection.concatenates([t, t], axis=1)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  with pytest.raises(ValueError, match="before `transposed`"):
    projection.shardings_like({"wo": t}, {"wo": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())})


@pytest.mark.parametrize("tokens", [1, 3])
def test_quantized_matmul_in_bfloat16_on_the_cpu(tokens):
  # bf16 compute on the CPU (a GPU config run there): the per-group products must still compile.
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.normal(size=(64, 32)) * 0.05, jnp.float32)
  qt = rtn.quantize_weight(w, Grid(4, 16), n_in=1)
  x = jnp.asarray(rng.normal(size=(tokens, 64)), jnp.bfloat16)
  ours = projection.project("TD,DO->TO", x, qt, jnp.bfloat16, out_dtype=jnp.float32)
  ref = jnp.einsum("TD,DO->TO", x.astype(jnp.float32), projection.dequantize(qt), precision="highest")
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=2e-2, atol=2e-2)


def test_round_to_nearest_error_is_within_half_a_step():
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  for grid in (Grid(8), Grid(4, 16), Grid(4, 16, symmetric=False)):
    qt = rtn.quantize_weight(w, grid, n_in=1)
    step = np.repeat(np.asarray(qt.scales, np.float32), 64 // qt.n_groups, axis=0)
    err = np.abs(np.asarray(projection.dequantize(qt)) - np.asarray(w))
    assert np.all(err <= 0.5 * step * (1 + 1e-3)), grid


@pytest.mark.slow
def test_int8_logits_are_within_a_tight_bound_of_float(params):
  q, _ = quantize_params(TINY, params, Grid(8), Options("rtn"))
  ref = np.asarray(M.forward(TINY, params, jnp.asarray(TOKENS)))
  ours = np.asarray(M.forward(TINY, q, jnp.asarray(TOKENS)))
  rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  q4, _ = quantize_params(TINY, params, Grid(4, 32), Options("rtn"))
  rel4 = np.linalg.norm(np.asarray(M.forward(TINY, q4, jnp.asarray(TOKENS))) - ref) / np.linalg.norm(ref)
  assert rel < 1e-2, rel  # per-weight RMS error of absmax int8: max|w| / 127 / sqrt(12) ~ 1% of std
  assert rel4 > 4 * rel, (rel, rel4)  # and int4 is measurably coarser: the bound is not vacuous
  assert isinstance(q["layers"]["block"]["feed_forward"]["w2"], projection.QuantizedTensor)
  assert not projection.is_quantized(q["tok_embeddings"]) and not projection.is_quantized(q["output"])


# --- GPTQ against a numpy transcription of the reference

def _np_params(x, bits, symmetric):
  """The grid of one group of the paper's layout x (rows = outputs, cols = inputs), as grid.py."""
  maxq = 2 ** bits - 1
  if symmetric:
    amax = np.abs(x).max(1)
    s = np.where(amax == 0, 1, amax / (2 ** (bits - 1) - 1)).astype(np.float16).astype(np.float64)
    return s, np.full_like(s, 2 ** (bits - 1))
  lo, hi = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
  flat = (lo == 0) & (hi == 0)
  lo[flat], hi[flat] = -1, 1
  s = ((hi - lo) / maxq).astype(np.float16).astype(np.float64)
  return s, np.clip(np.round(-lo / s), 0, maxq)


def _np_gptq(W, H, bits, gs, symmetric, blocksize, percdamp=0.01, actorder=False):
  """IST-DASLab/gptq `GPTQ.fasterquant`, line by line in float64 numpy (rows = outputs)."""
  W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
  cols, maxq = W.shape[1], 2 ** bits - 1
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  if actorder:
    groups = [_np_params(W[:, i:i + gs], bits, symmetric) for i in range(0, cols, gs)]
    perm = np.argsort(-np.diag(H), kind="stable")
    W, H = W[:, perm], H[perm][:, perm]
  H[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.diag(H))
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
  Q = np.zeros_like(W)
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    W1, Q1, Err1 = W[:, i1:i2].copy(), np.zeros((W.shape[0], i2 - i1)), np.zeros((W.shape[0], i2 - i1))
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      w, d = W1[:, i], Hinv1[i, i]
      if actorder:
        s, z = groups[perm[i1 + i] // gs]
      elif (i1 + i) % gs == 0:
        s, z = _np_params(W[:, i1 + i:i1 + i + gs], bits, symmetric)
      q = np.clip(np.round(w / s) + z, 0, maxq)
      Q1[:, i] = q
      err = (w - s * (q - z)) / d
      W1[:, i:] -= np.outer(err, Hinv1[i, i:])
      Err1[:, i] = err
    Q[:, i1:i2] = Q1
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  return Q[:, np.argsort(perm)] if actorder else Q


@pytest.mark.parametrize("bits, gs, symmetric, act_order", [
    (4, 16, True, False), (4, 16, False, True), (8, 80, True, False), (4, 40, False, False)])
def test_gptq_solver_equals_a_numpy_transcription_of_the_reference(bits, gs, symmetric, act_order):
  rng = np.random.default_rng(4)
  k, o, n = 80, 24, 400  # 80 inputs: two and a half blocks of 32
  X = rng.normal(size=(n, k)) * rng.uniform(0.2, 2.0, size=k)
  X[:, :8] += X[:, 8:16]  # correlated inputs: where GPTQ's updates matter
  X[:, 5] = 0  # a dead input
  W = rng.normal(size=(k, o)) * 0.05
  H = 2 * X.T @ X / n
  q, _, _ = gptq(jnp.asarray(W, jnp.float32), jnp.asarray(H, jnp.float32), bits=bits, group_size=gs,
                 symmetric=symmetric, block_size=32, act_order=act_order)
  ref = _np_gptq(W.T, H, bits, gs, symmetric, blocksize=32, actorder=act_order).T
  # float32 against float64: an integer may land on the other side of a rounding tie, rarely
  assert np.mean(np.asarray(q) != ref) < 0.005


def _calibration_windows(saved, n, length):
  tokens = llama_jax.load(saved / "float").tokenizer.encode((saved / "corpus.txt").read_text(), bos=True)
  return calibration.windows(tokens, n, length)


@pytest.mark.slow
def test_gptq_reconstructs_every_layer_better_than_round_to_nearest(saved, params):
  windows = _calibration_windows(saved, 8, 32)
  grid = Grid(4, 32)
  q, report = quantize_params(TINY, params, grid, Options("gptq", block_size=32), windows)
  assert len(report) == TINY.n_layers * len(M.PROJECTIONS)
  for row in report:
    assert row["gptq"] < row["rtn"], row
  # One entry checked from first principles: layer 0's wq sees attention_norm(embedding).
  layer0 = jax.tree.map(lambda a: a[0], params["layers"]["block"])
  x = M.Transformer(TINY).apply({"params": params}, jnp.asarray(windows), method="embed")
  x = M.RMSNorm(TINY).apply({"params": layer0["attention_norm"]}, x).reshape(-1, TINY.dim)
  w = layer0["attention"]["wq"].reshape(TINY.dim, -1)
  approx = projection.dequantize(jax.tree.map(lambda a: a[0], q["layers"]["block"]["attention"]["wq"]))
  baseline = projection.dequantize(rtn.quantize_weight(layer0["attention"]["wq"], grid, 1))

  def error(a):
    return float(jnp.sum(jnp.square(x @ (w - a.reshape(w.shape)))) / jnp.sum(jnp.square(x @ w)))
  assert error(approx) == pytest.approx(report[0]["gptq"], rel=1e-3)
  assert error(baseline) == pytest.approx(report[0]["rtn"], rel=1e-3)
  assert error(approx) < 0.9 * error(baseline)


def test_gptq_with_output_channels_sharded_equals_one_device():
  rng = np.random.default_rng(5)
  X = rng.normal(size=(200, 48))
  W = jnp.asarray(rng.normal(size=(48, 64)) * 0.05, jnp.float32)
  H = jnp.asarray(2 * X.T @ X / 200, jnp.float32)
  kwargs = dict(bits=4, group_size=16, symmetric=True, block_size=16)
  one = gptq(W, H, **kwargs)
  mesh = sharding.make_mesh(1, -1, 1)
  placed = jax.device_put(W, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, mesh.axis_names)))
  many = gptq(placed, H, **kwargs)
  assert len(many[0].sharding.device_set) == jax.device_count()
  for a, b in zip(one, many):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_calibration_windows_are_distinct_and_a_short_text_is_an_error():
  tokens = np.arange(100)
  w = calibration.windows(tokens, 3, 20, seed=1)
  assert w.shape == (3, 20) and len({row[0] for row in w}) == 3 and all(row[0] % 20 == 0 for row in w)
  with pytest.raises(ValueError, match="encodes to 100 tokens, fewer than the 6 x 20 = 120"):
    calibration.windows(tokens, 6, 20)


# --- checkpoints, the engine, the command lines

def _quantize(saved, name, *flags):
  quantize_cli.main(["--model", str(saved / "float"), "--output", str(saved / name), *flags])
  return saved / name


@pytest.mark.slow
def test_quantized_checkpoint_loads_packed_and_gives_the_same_logits(saved, params):
  path = _quantize(saved, "int4", "--bits", "4", "--group_size", "32", "--scheme", "asym")
  info = json.loads((path / checkpoint.QUANTIZATION).read_text())
  assert info["method"] == "rtn" and info["weights"]["layers/block/attention/wo"]["n_in"] == 2
  # On disk: uint8, two values a byte (read back raw, without the description).
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(str(path / "params"))
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  w1 = tree["layers"]["block"]["feed_forward"]["w1"]["values"]
  assert w1.dtype == np.uint8 and tuple(w1.shape) == (TINY.n_layers, TINY.dim // 2, TINY.hidden_dim)

  model = llama_jax.load(path)
  wq = model.params["layers"]["block"]["attention"]["wq"]
  assert projection.is_quantized(wq) and wq.values.dtype == jnp.uint8 and not wq.symmetric
  expected, _ = quantize_params(TINY, params, Grid(4, 32, symmetric=False), Options("rtn"))
  np.testing.assert_allclose(model.logits(TOKENS), np.asarray(M.forward(TINY, expected, jnp.asarray(TOKENS))),
                             rtol=1e-6, atol=1e-6)
  # int4 with a float16 scale and a uint8 zero per 32 weights: 0.59 bytes a weight against 4
  assert projection.nbytes(model.params["layers"]) < 0.2 * projection.nbytes(params["layers"])

  # Saved again (Model.save): the same weights, and how they were made is not lost.
  model.save(str(path.parent / "int4_again"))
  again = json.loads((path.parent / "int4_again" / checkpoint.QUANTIZATION).read_text())
  assert again == info
  np.testing.assert_array_equal(llama_jax.load(path.parent / "int4_again").logits(TOKENS), model.logits(TOKENS))


def test_quantized_checkpoint_loads_onto_a_mesh(saved):
  path = _quantize(saved, "int8", "--bits", "8")
  single = llama_jax.load(path)
  mesh = sharding.make_mesh(1, 2, 4)
  placed = llama_jax.load(path, mesh=mesh)
  wq = placed.params["layers"]["block"]["attention"]["wq"]
  assert len(wq.values.sharding.device_set) == 8
  np.testing.assert_allclose(placed.logits(TOKENS), single.logits(TOKENS), rtol=1e-5, atol=1e-5)


def test_decoding_quantized_weights_equals_the_full_forward(saved):
  model = llama_jax.load(_quantize(saved, "int4_sym", "--bits", "4", "--group_size", "32"))
  prompts = [[1, 7, 9, 30], [1, 200, 5, 6, 7, 8, 9]]
  out = generate_tokens(model.config, model.params, prompts, 5, return_logits=True)
  width = max(len(p) + len(new) for p, (new, _) in zip(prompts, out))
  tokens = np.zeros((2, width), np.int32)
  for row, (p, (new, _)) in enumerate(zip(prompts, out)):
    tokens[row, :len(p) + len(new)] = p + new
  full = np.asarray(M.forward(model.config, model.params, jnp.asarray(tokens)))
  for row, (p, (new, logits)) in enumerate(zip(prompts, out)):
    for s in range(5):
      np.testing.assert_allclose(logits[s], full[row, len(p) - 1 + s], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_decode_step_makes_no_full_precision_copy_of_the_weights():
  cfg = ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=64,
                    max_seq_len=32)
  params = nn.unbox(M.init_params(cfg, jax.random.key(0)))
  q, _ = quantize_params(cfg, params, Grid(8), Options("rtn"))
  prepared = engine.prepare_params(cfg, q)
  # The decode layout (engine.fuse_layer): wq|wk|wv and w1|w3 side by side, every projection
  # output-major, still integers.
  attention, ffn = prepared.layers[0]["attention"], prepared.layers[0]["feed_forward"]
  assert set(attention) == {"wqkv_t", "wo_t"} and set(ffn) == {"w13_t", "w2_t"}
  weights = (attention["wqkv_t"], attention["wo_t"], ffn["w13_t"], ffn["w2_t"])
  assert all(projection.is_quantized(w) and w.output_major for w in weights)
  assert attention["wqkv_t"].values.shape == (cfg.dim + 2 * 2 * cfg.head_dim, cfg.dim)
  assert attention["wqkv_t"].values.dtype == jnp.int8
  assert attention["wqkv_t"].scales.dtype == jnp.float16  # not cast: as stored
  from llama_jax.generate.generator import make_batch
  from llama_jax.generate.sampling import SamplingParams
  batch = make_batch(cfg, [[1, 2, 3]], [0], 8)
  state = jax.eval_shape(lambda: engine.prefill(  # the decode loop's input, without running a prefill
      cfg, prepared, jnp.asarray(batch.tokens), jnp.asarray(batch.prompt_lengths),
      jnp.asarray(batch.limits), jax.random.split(jax.random.key(0), 1),
      jax.tree.map(jnp.asarray, SamplingParams.make(1)), jnp.array([-1]), cache_len=batch.cache_len,
      budget=batch.budget))
  compiled = engine.decode.lower(cfg, prepared, state, jnp.array(batch.budget)).compile()
  scratch = compiled.memory_analysis().temp_size_in_bytes
  float_blocks = sum(x.nbytes for x in jax.tree.leaves(params["layers"]))
  # A step converts one matrix at a time where it is used. XLA hoisting the loop-invariant
  # conversions out of the loop (what `projection.signed_groups(after=...)` prevents) measured
  # 1.0 to 2.0 times the float32 blocks here; converting where used, about 0.13.
  assert scratch < 0.35 * float_blocks, (scratch, float_blocks)


@pytest.mark.slow
def test_evaluate_compares_float_and_quantized_models_in_one_table(saved, capsys):
  from llama_jax.evaluate.__main__ import main as evaluate
  int8 = _quantize(saved, "int8_table", "--bits", "8")
  int4 = _quantize(saved, "int4_table", "--bits", "4", "--group_size", "32")
  capsys.readouterr()
  text = saved / "eval.txt"
  text.write_text(" ".join((saved / "corpus.txt").read_text().split()[:300]))
  assert evaluate(["perplexity", "--model", str(saved / "float"), "--model", str(int8), "--model", str(int4),
                   "--data", str(text), "--seq_len", "32", "--no_progress"]) == 0
  out = capsys.readouterr().out.splitlines()
  rows = json.loads(out[-1])
  assert [r["model"] for r in rows] == [str(saved / "float"), str(int8), str(int4)]
  assert len(out) == 2 + 3 + 1 and "perplexity" in out[0]  # header, rule, three rows, JSON
  base = rows[0]["perplexity"]
  assert abs(rows[1]["perplexity"] - base) < abs(rows[2]["perplexity"] - base) + 1e-3 * base


@pytest.mark.parametrize("flags, message", [
    (["--bits", "3"], "--bits must be 4 or 8, got 3"),
    (["--bits", "4", "--group_size", "48"], "group size 48 does not divide the input width 64"),
    (["--bits", "4", "--method", "gptq"], "--method gptq needs --calibration"),
    (["--bits", "8", "--scheme", "nf4"], "--scheme must be sym or asym"),
    (["--bits", "4", "--group_size", "32", "--method", "gptq", "--calibration", "{short}",
      "--calibration_samples", "64", "--calibration_len", "32"], "fewer than the 64 x 32 = 2048"),
    (["--bits", "4", "--group_size", "32", "--method", "gptq", "--calibration", "{missing}"],
     "--calibration {missing}: no such file; expected calibration text, a .txt or a .jsonl"),
    (["--bits", "4", "--group_size", "32", "--method", "gptq", "--calibration", "{tmp}"],
     "--calibration {tmp}: not a file; expected calibration text"),
])
def test_bad_input_is_one_line(saved, tmp_path, capsys, flags, message):
  short = tmp_path / "short.txt"
  short.write_text("the cat sat on the mat")
  names = dict(short=short, missing=tmp_path / "nofile", tmp=tmp_path)
  flags, message = [f.format(**names) for f in flags], message.format(**names)
  with pytest.raises(SystemExit) as exit_info:
    quantize_cli.main(["--model", str(saved / "float"), "--output", str(tmp_path / "out"), *flags])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_gptq_command_line_writes_a_model_that_generates(saved):
  path = _quantize(saved, "gptq", "--bits", "4", "--group_size", "32", "--method", "gptq",
                   "--calibration", str(saved / "corpus.txt"), "--calibration_samples", "4",
                   "--calibration_len", "32", "--block_size", "32")
  info = json.loads((path / checkpoint.QUANTIZATION).read_text())
  assert info["method"] == "gptq" and info["calibration_samples"] == 4
  model = llama_jax.load(path)
  out = model.generate(["the cat"], max_new_tokens=4)
  assert isinstance(out[0], str)
  assert math.isfinite(float(model.logits(TOKENS).sum()))


def test_an_output_of_our_own_is_replaced_and_any_other_refused(saved, tmp_path, capsys):
  """Quantizing again into a quantized model's folder replaces it; a folder holding something else
  (here a Hugging Face export: transformers would read it, `llama_jax.load` the quantized model
  beside it) is one line naming what is there, before anything is loaded."""
  out = tmp_path / "q"
  assert quantize_cli.main(["--model", str(saved / "float"), "--output", str(out), "--bits", "8"]) == 0
  assert quantize_cli.main(["--model", str(saved / "float"), "--output", str(out), "--bits", "4",
                            "--group_size", "32"]) == 0
  assert json.loads((out / checkpoint.QUANTIZATION).read_text())["bits"] == 4
  exported = tmp_path / "hf"
  llama_jax.load(saved / "float").export_hf(str(exported))
  before = sorted(os.listdir(exported))
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    quantize_cli.main(["--model", str(saved / "float"), "--output", str(exported), "--bits", "8"])
  err = capsys.readouterr().err
  assert exit_info.value.code == 1 and err == (
      f"error: --output {exported} holds a Hugging Face checkpoint (model.safetensors), not a llama_jax "
      "model: choose a new or empty directory, or pass --overwrite to write into it anyway\n"), err
  assert sorted(os.listdir(exported)) == before


def test_a_quantized_checkpoint_does_not_convert_as_a_float_model(saved, tmp_path, capsys):
  from llama_jax.convert import cli as convert
  int8 = _quantize(saved, "int8_convert", "--bits", "8")
  capsys.readouterr()
  assert convert.main(["--input", str(int8), "--output", str(tmp_path / "hf"), "--to", "hf"]) == 1
  err = capsys.readouterr().err.strip()
  assert "holds quantized weights" in err and len(err.splitlines()) == 1, err
  with pytest.raises(ValueError, match="the model is quantized"):
    llama_jax.load(int8).export_hf(str(tmp_path / "hf2"))


@pytest.mark.slow
def test_quantized_weights_concatenate_along_their_outputs():
  # What a fused decode layout (wq|wk|wv side by side) needs of quantized weights.
  rng = np.random.default_rng(7)
  grid = Grid(4, 16, symmetric=False)
  ws = [jnp.asarray(rng.normal(size=(32, heads, 8)), jnp.float32) for heads in (4, 2, 2)]
  qts = [rtn.quantize_weight(w, grid, n_in=1) for w in ws]
  fused = projection.concatenate(qts, axis=1)
  assert fused.shape == (32, 8, 8) and fused.values.shape == (16, 64)
  np.testing.assert_array_equal(np.asarray(projection.dequantize(fused)),
                                np.concatenate([np.asarray(projection.dequantize(q)) for q in qts], axis=1))
  np.testing.assert_array_equal(np.asarray(projection.concatenate(ws, axis=1)), np.concatenate(ws, axis=1))
  with pytest.raises(ValueError, match="first output axis"):
    projection.concatenate(qts, axis=2)
