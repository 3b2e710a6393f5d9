"""The fused decode kernels (`llama_jax.kernels.decode_block`) against XLA on one GPU.

  python benchmarks/decode_kernels_check.py [--config configs/tinyllama_1b.py] [--rows 1] [--quantize int8|int4]

For each batch size, one JSON line each:
  agreement  the engine's greedy decode (random weights in the decode layout, 64 new tokens after a
             128-token prompt) with `decode_kernels` xla and pallas, and XLA's in float32 (the same
             weights): for each pair, the logits of the first step the loop draws (max abs
             difference, beside the logits' size) and how many tokens the two agree on before their
             first difference (roundings differ: a near-tie may go either way after that); and
             teacher-forced, each fed XLA's tokens of every row, the largest logit difference
             over every step (`forced_max_abs_diff`: like with like after a near-tie too); with
             `--quantize`, the weights quantized by round-to-nearest and float32's run on their
             dequantized values
  matvec     each fused matrix-vector kernel against the same computation in XLA: its error, and
             n_layers copies of the weight (so they do not sit in L2) in one call, timed from the
             host (median of 20: the call's dispatch included, so only a coarse comparison;
             `kernel_sweep.py` times the kernels themselves)
  attention  rotary + cache write + attention for one layer's step, by cache length: the fused
             kernel against XLA's (rotary, scatter, masked attention over the whole cache), its
             error and host-timed calls as above
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax import model as M  # noqa: E402
from llama_jax import projection  # noqa: E402
from llama_jax.bench.decode import random_engine_params  # noqa: E402
from llama_jax.bench.common import median_call_us  # noqa: E402
from llama_jax.config import ModelConfig  # noqa: E402
from llama_jax.generate import engine  # noqa: E402
from llama_jax.generate.cache import KVCache  # noqa: E402
from llama_jax.generate.generator import forced_batch_logits, generate_tokens  # noqa: E402
from llama_jax.train.cli import load_config  # noqa: E402
from llama_jax.kernels import decode_attention, decode_block, matvec  # noqa: E402


def agreement(cfg: ModelConfig, params, rows: int, prompt_len: int = 128, new_tokens: int = 64) -> dict:
  rng = np.random.default_rng(rows)
  prompts = rng.integers(3, cfg.vocab_size, (rows, prompt_len)).tolist()
  runs = {}
  float32 = jax.tree.map(  # a quantized weight as its dequantized values, output-major as stored
      lambda a: projection.dequantize(a).T if projection.is_quantized(a) else a.astype(jnp.float32),
      params, is_leaf=projection.is_quantized)
  variants = (("xla", cfg.replace(decode_kernels="xla"), params),
              ("pallas", cfg.replace(decode_kernels="pallas"), params),
              ("float32", cfg.replace(decode_kernels="xla", dtype="float32", attention_impl="xla"), float32))
  for label, c, p in variants:
    results = generate_tokens(c, p, prompts, new_tokens, return_logits=True)  # greedy
    runs[label] = (np.asarray([t for t, _ in results]), np.asarray([logits[1] for _, logits in results]))

  def compare(a: str, z: str) -> dict:
    (tokens_a, logits_a), (tokens_z, logits_z) = runs[a], runs[z]
    same = [int(np.argmax(np.append(ta != tz, True))) for ta, tz in zip(tokens_a, tokens_z)]
    # Column 1: the first token the decode loop draws (column 0 comes from the prefill).
    return {"first_step_max_abs_diff": float(np.abs(logits_a - logits_z).max()),
            "tokens_equal_before_first_difference": same}

  # Teacher-forced: every run fed the prompts and XLA's greedy tokens (every row: at more than one
  # row, the batch blocks), so that each step's logits compare like with like even after the
  # free-running runs part at a near-tie.
  forced = {label: forced_batch_logits(c, p, prompts, list(runs["xla"][0])) for label, c, p in variants}

  def forced_diff(a: str, z: str) -> float:
    return float(np.abs(forced[a] - forced[z]).max())

  pallas = cfg.replace(decode_kernels="pallas")
  applied = ("blocks" if engine.fused_blocks(pallas, params, rows) else
             "batch" if engine.fused_attention(pallas, params) else False)
  return {"check": "agreement", "rows": rows, "new_tokens": new_tokens, "kernels_applied": applied,
          "logits_abs_max": float(np.abs(runs["float32"][1]).max()),
          "pallas_vs_xla": compare("pallas", "xla"), "xla_vs_float32": compare("xla", "float32"),
          "pallas_vs_float32": compare("pallas", "float32"),
          "forced_max_abs_diff": {"pallas_vs_xla": forced_diff("pallas", "xla"),
                                  "xla_vs_float32": forced_diff("xla", "float32"),
                                  "pallas_vs_float32": forced_diff("pallas", "float32")},
          "forced_logits_abs_max": float(np.abs(forced["float32"]).max())}


def product_inputs(product: decode_block.Product, rows: int, layers: int, key, quantize: str = "") -> tuple:
  """(x, `layers` random copies of the weight, `matvec`'s keyword arguments) for one product; with
  `quantize` ("int8": per output channel, "int4": groups of 128) the weights quantized by
  round-to-nearest, in the output-major decode layout."""
  ws = [jax.random.normal(jax.random.fold_in(key, i), (product.outputs, product.inputs), jnp.bfloat16) * 0.02
        for i in range(layers)]
  if quantize:
    from llama_jax.bench.decode import QUANTIZE
    from llama_jax.quantize.grid import Grid
    from llama_jax.quantize.rtn import quantize_weight
    grid = Grid(*QUANTIZE[quantize])
    ws = [projection.transposed(quantize_weight(w.T.astype(jnp.float32), grid, 1, name=product.weight))
          for w in ws]
  x = jax.random.normal(key, (rows, product.inputs), jnp.bfloat16)
  width = product.outputs // 2 if product.gate_up else product.outputs
  kw = dict(norm=jnp.ones((product.inputs,), jnp.bfloat16) if product.norm else None,
            residual=jnp.ones((rows, width), jnp.bfloat16) if product.residual else None,
            gate_up=product.gate_up)
  return x, ws, kw


def matvecs(cfg: ModelConfig, rows: int, quantize: str = "") -> list[dict]:
  out = []
  key = jax.random.key(rows)
  for product in decode_block.products(cfg):
    x, ws, kw = product_inputs(product, rows, cfg.n_layers, key, quantize)
    row = {"check": "matvec", "weight": product.weight, "rows": rows,
           "shape": [product.outputs, product.inputs]}
    for label, fn in (("pallas", matvec.matvec), ("xla", matvec.reference)):
      call = jax.jit(lambda x, ws, fn=fn: [fn(x, w, **kw) for w in ws])
      row[f"{label}_call_us_per_weight"] = round(median_call_us(call, x, ws, reps=20) / len(ws), 2)
    got = jax.jit(lambda x, w: matvec.matvec(x, w, **kw))(x, ws[0]).astype(jnp.float32)
    want = matvec.reference(x, ws[0], **kw).astype(jnp.float32)
    row["max_abs_diff"] = float(jnp.max(jnp.abs(got - want)))
    out.append(row)
  return out


def attention(cfg: ModelConfig, rows: int, length: int) -> dict:
  n, kv, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  key = jax.random.key(length)
  qkv = jax.random.normal(key, (rows, n + 2 * kv, h), jnp.bfloat16)
  cache = [jax.random.normal(jax.random.fold_in(key, i), (rows, kv, length, h), jnp.bfloat16)
           for i in (1, 2)]
  positions = jnp.full((rows,), length - 1, jnp.int32)
  sin, cos = M.rotary_tables(positions[:, None], cfg)

  def fused(qkv, k, v):
    return decode_attention.rotary_cache_attention(qkv, sin[:, 0, 0], cos[:, 0, 0], positions, k, v,
                                                   n_heads=n)

  def xla(qkv, k, v):
    q, kn, vn = qkv[:, None, :n], qkv[:, None, n:n + kv], qkv[:, None, n + kv:]
    q, kn = M.rotary(q, (sin, cos)), M.rotary(kn, (sin, cos))
    c = KVCache(k, v).write(kn, vn, positions[:, None])
    mask = M.attention_mask(positions[:, None], jnp.broadcast_to(jnp.arange(length), (rows, length)))
    return M.xla_attention(q, c.k, c.v, mask, "BKSH")[:, 0], c.k, c.v

  row = {"check": "attention", "rows": rows, "cache_length": length}
  for label, fn in (("pallas", fused), ("xla", xla)):
    row[f"{label}_call_us"] = round(median_call_us(jax.jit(fn), qkv, *cache, reps=20), 2)
  got, want = jax.jit(fused)(qkv, *cache)[0], jax.jit(xla)(qkv, *cache)[0]
  row["max_abs_diff"] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
  return row


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/tinyllama_1b.py")
  p.add_argument("--rows", default="1", help="batch sizes (the kernels apply at one row: "
                 "`kernels_applied` says)")
  p.add_argument("--lengths", default="384,2048")
  p.add_argument("--checks", default="agreement,matvec,attention")
  p.add_argument("--quantize", default="", help="int8 or int4: the model's (and the products') weights quantized")
  args = p.parse_args()
  checks = args.checks.split(",")
  cfg = ModelConfig.from_dict(load_config(args.config).model)
  params = random_engine_params(cfg, quantize=args.quantize)
  for rows in map(int, args.rows.split(",")):
    if "agreement" in checks:
      print(json.dumps({"quantize": args.quantize or "none", **agreement(cfg, params, rows)}), flush=True)
    for row in matvecs(cfg, rows, args.quantize) if "matvec" in checks else ():
      print(json.dumps(row), flush=True)
    for length in map(int, args.lengths.split(",")) if "attention" in checks else ():
      print(json.dumps(attention(cfg, rows, length)), flush=True)


if __name__ == "__main__":
  main()
