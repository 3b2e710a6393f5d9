"""One transformer block of a decode step (one token a row) as five Pallas kernels.

XLA compiles a decode block into ~22 kernels, most of them 1-2 microseconds long (norms, rotary,
the cache writes, softmax's pieces, SwiGLU, residual adds) between the matrix-vector products, and
a batch-1 step is bound by those launches as much as by reading the weights. Here a block is

  1. RMSNorm + wq|wk|wv                         `matvec(x, wqkv_t, norm=...)`
  2. rotary, the cache write, attention         `decode_attention.rotary_cache_attention`
  3. wo + the residual                          `matvec(attention, wo_t, residual=x)`
  4. RMSNorm + w1|w3 + SwiGLU                   `matvec(x, w13_t, norm=..., gate_up=True)`
  5. w2 + the residual                          `matvec(hidden, w2_t, residual=x)`

on the engine's decode layout (`generate.engine.fuse_layer`: output-major weights, plain or
quantized), computing what `model.Block` computes to the compute dtype's precision (RMSNorm folded
into the product and attention accumulated blockwise round differently: see `matvec` and
`decode_attention`). Where it does not apply (more than one row, LoRA weights, a float32 model,
shapes the kernels do not tile, a mesh) the engine runs `batch_block` below, or where that does not
apply either (LoRA weights, a float32 model, heads the attention kernel does not tile, a mesh)
`model.Block`.

A step of more rows (`batch_block`) keeps XLA's GEMMs for wq|wk|wv and w1|w3, whose tiles beat
Triton's dot on rows padded to 16 there, and runs the attention through the fused kernel (rotary,
the cache write and attention over each row's filled positions in one kernel where XLA launches
about ten: two rotaries, two cache scatters, the scores, softmax's pieces, the weighted values) and,
up to 16 rows, wo and w2 with their residual adds as `matvec` kernels (BATCH_KERNELS).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from llama_jax import projection
from llama_jax.config import ModelConfig
from llama_jax.kernels import decode_attention, matvec

Array = jax.Array

# Batch rows a decode step runs through the kernels. One row is where they win (TinyLlama-1.1B, H100,
# one call: 1.135 against XLA's 1.364 ms a step); at 16 rows Triton's dot on rows padded to 16
# was slower than XLA's GEMMs (H200: 1.91 against 1.46 ms), at 64 far slower (H100: 3.40 against
# 1.85). On quantized weights too (H100, 16 rows: 135 us a layer at int4 against XLA's ~100).
# BENCHMARKS.md, "Fused decode blocks" and "Fused blocks on quantized weights". Larger steps run
# `batch_block` below (XLA's GEMMs where they win, the kernels between them).
MAX_ROWS = 1


class Product(NamedTuple):
  """One of a block's four matrix-vector products: its weight (module, name in the decode layout),
  the weight's outputs and inputs (it is (outputs, inputs)), and what `matvec` does around it."""
  module: str
  weight: str
  outputs: int
  inputs: int
  norm: bool = False
  residual: bool = False
  gate_up: bool = False


def products(cfg: ModelConfig) -> tuple[Product, ...]:
  """wq|wk|wv (after RMSNorm), wo (+ the residual), w1|w3 (after RMSNorm, SwiGLU), w2 (+ the residual)."""
  d, f, n, kv, h = cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  return (Product("attention", "wqkv_t", (n + 2 * kv) * h, d, norm=True),
          Product("attention", "wo_t", d, n * h, residual=True),
          Product("feed_forward", "w13_t", 2 * f, d, norm=True, gate_up=True),
          Product("feed_forward", "w2_t", d, f, residual=True))


def applies(cfg: ModelConfig, layer: Any, rows: int) -> bool:
  """Whether `block` runs this layer for `rows` rows."""
  if rows > MAX_ROWS:
    return False
  if jnp.dtype(cfg.dtype) not in (jnp.bfloat16, jnp.float16):
    return False  # Triton's dot on float32 would round through TF32; the model's matmuls do not
  def runs(p: Product) -> bool:
    w = layer.get(p.module, {}).get(p.weight)
    if projection.is_quantized(w):
      return w.output_major and matvec.supported(rows, p.inputs, p.outputs, p.gate_up,
                                                 weight=matvec.Weight.of(w))
    return isinstance(w, jax.Array) and matvec.supported(rows, p.inputs, p.outputs, p.gate_up)

  return decode_attention.supported_head_dim(cfg.head_dim) and all(map(runs, products(cfg)))


def block(cfg: ModelConfig, layer: Any, x: Array, positions: Array, sin: Array, cos: Array,
          k_cache: Array, v_cache: Array, kernels: frozenset[str] | None = None) -> tuple[Array, Array, Array]:
  """x (B, D) each row's one token; positions (B,); sin, cos (B, H/2) at those positions; the
  layer's cache (B, K, S, H) each. Returns (the block's output (B, D), k_cache, v_cache).
  `kernels`: the products (by weight name) that run as `matvec` kernels, the rest as `model.Block`
  runs them (XLA's matmul, norm, SwiGLU and residual add); default all four."""
  rows = x.shape[0]
  n, kv, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  wqkv, wo, w13, w2 = products(cfg)

  def run(p: Product, y: Array, norm: str | None = None, residual: Array | None = None) -> Array:
    w = layer[p.module][p.weight]
    g = None if norm is None else layer[norm]["weight"]
    if kernels is None or p.weight in kernels:
      return matvec.matvec(y, w, norm=g, eps=cfg.norm_eps, residual=residual, gate_up=p.gate_up)
    if g is not None:
      y = matvec.rms_norm(y, g, cfg.norm_eps)
    out = projection.project("BD,ND->BN", y, w, cfg.dtype)
    if p.gate_up:
      gate, up = jnp.split(out, 2, axis=-1)
      out = jax.nn.silu(gate) * up
    return out if residual is None else residual + out

  qkv = run(wqkv, x, norm="attention_norm")
  splits = attention_splits(k_cache.shape[2], h, rows * kv)
  out, k_cache, v_cache = decode_attention.rotary_cache_attention(
      qkv.reshape(rows, n + 2 * kv, h), sin, cos, positions, k_cache, v_cache, n_heads=n, splits=splits)
  x = run(wo, out.reshape(rows, n * h), residual=x)
  hidden = run(w13, x, norm="ffn_norm")
  return run(w2, hidden, residual=x), k_cache, v_cache


# Cache positions one program of the attention kernel reads at most, when a step has fewer (row, KV
# head) programs than SPLIT_BELOW_PROGRAMS: the cache is then dealt out in stretches of it, a program
# each (`decode_attention.rotary_cache_attention`'s `splits`), joined by XLA after (flash decoding);
# 0: one program a row and KV head always. One program a row and KV head keeps only rows x K SMs
# busy (4 at one TinyLlama row) while it streams the row's positions block after block. Measured
# (session 14, `gpu.sh splits`, a process each, prompt 128 + 256): at one row (4 programs)
# stretches of 128 took 0.940 ms a step against 0.980 on an H200, 1.072 and 1.074 against 1.111
# and 1.086 on an H100; at 16 rows (64 programs) 1.116 against 1.151 on the H200 but 1.359 and
# 1.353 against 1.362 and 1.304 on the H100 (within the spread of XLA's per-process GEMM picks,
# and the batch-16 target is an H100's): from 64 programs, one; at 64 rows (256 programs) stretches
# of 256 were slower on the H200, 1.797 against 1.686 ms.
ATTENTION_SPLIT = 128
SPLIT_BELOW_PROGRAMS = 64


def attention_splits(length: int, head_dim: int, programs: int = 1) -> int:
  """The stretches a cache of `length` positions is read in when a step runs `programs` (rows x KV
  heads) of the attention kernel (1: one program a row and KV head), whole blocks of the kernel's
  loop each."""
  if not ATTENTION_SPLIT or programs >= SPLIT_BELOW_PROGRAMS:
    return 1
  block = decode_attention.rotary_block(length, head_dim)
  return -(-length // block // max(1, ATTENTION_SPLIT // block))  # whole blocks a stretch, none empty


# The products a step of more rows than MAX_ROWS runs as `matvec` kernels (Triton's dot on rows
# padded to 16, with the residual add inside) where they tile: plain weights, up to matvec.MAX_ROWS
# rows; the others through XLA's GEMMs. TinyLlama-1.1B, batch 16, one H100, one process
# (benchmarks/batch_kernels.py at 31d430b, now decode_variants.py): wo and w2 as kernels 1.297 ms
# a step, none 1.365, wo alone 1.363, w2 alone 1.385, wq|wk|wv 1.736, w1|w3 1.973, all four 2.349;
# XLA's blocks 1.630. XLA's autotuned picks differ between processes: over two rounds of fresh
# processes (session 13, another H100) wo and w2 as kernels 1.287 and 1.315 against none 1.367 and
# 1.399. On an H200 the ranking reverses (1.217 against 1.148: BENCHMARKS.md, "Session 13").
BATCH_KERNELS: frozenset[str] = frozenset({"wo_t", "w2_t"})


def batch_applies(cfg: ModelConfig, layer: Any) -> bool:
  """Whether `batch_block` runs this layer: every product in the decode layout, stacked where it
  reads a shared input (not a layer with LoRA adapters, which keep each projection apart, nor one
  whose weights would not stack), heads the attention kernel tiles, a half-precision model
  (Triton's dot on float32 would round through TF32)."""
  return (all(p.weight in layer.get(p.module, {}) for p in products(cfg))
          and jnp.dtype(cfg.dtype) in (jnp.bfloat16, jnp.float16)
          and decode_attention.supported_head_dim(cfg.head_dim))


def batch_block(cfg: ModelConfig, layer: Any, x: Array, positions: Array, sin: Array, cos: Array,
                k_cache: Array, v_cache: Array) -> tuple[Array, Array, Array]:
  """`block` for any number of rows: rotary, the cache write and attention as the fused kernel
  (`decode_attention.rotary_cache_attention`, one kernel where XLA launches about ten), the
  products as XLA's GEMMs with `model.Block`'s norms, SwiGLU and residual adds around them, but
  those of BATCH_KERNELS that `matvec` tiles at this many rows."""
  rows = x.shape[0]

  def tiles(p: Product) -> bool:
    w = layer[p.module][p.weight]
    # Quantized weights keep XLA's GEMMs: the dot form on converted integers was slower at 16 rows
    # (BENCHMARKS.md, "Fused blocks on quantized weights").
    return (p.weight in BATCH_KERNELS and isinstance(w, jax.Array)
            and matvec.supported(rows, p.inputs, p.outputs, p.gate_up))

  kernels = frozenset(p.weight for p in products(cfg) if tiles(p))
  return block(cfg, layer, x, positions, sin, cos, k_cache, v_cache, kernels=kernels)
