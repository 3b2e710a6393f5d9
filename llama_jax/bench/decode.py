"""Generation throughput: the real engine (prefill, then the decode loop) on random weights.

  python -m llama_jax.bench decode --config configs/tinyllama_1b.py --batch_size B --prompt_len P --new_tokens N
      [--quantize int8|int4 --group_size G]

Prefill and decode are timed apart (median of `repeats`); every row decodes all N tokens (no EOS).
The random weights are made directly in the engine's layout and compute dtype, one jitted draw per
tensor: no Flax initialisation of the whole model and no second copy. `--quantize` makes every block
projection a weight-only int8 (per output channel) or int4 (groups of `--group_size`) tensor by
round-to-nearest, one layer at a time; the embedding and output head stay in the compute dtype.
Reported beside the speed: the bytes of the weights, the bytes a step must read at least (every
weight once, the output head whole, the KV cache at its full length) and, on a GPU whose memory
bandwidth is known, the time that takes (`floor_ms_per_step`).
"""

from __future__ import annotations

import hashlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import model as M
from llama_jax import projection
from llama_jax.bench.common import device_info, peak_bandwidth, profiled
from llama_jax.config import ModelConfig
from llama_jax.generate import engine
from llama_jax.generate.generator import make_batch
from llama_jax.generate.sampling import SamplingParams
from llama_jax.kernels import decode_block
from llama_jax.model import param_shapes
from llama_jax.train import metrics


QUANTIZE = {"int8": (8, 0), "int4": (4, 128)}  # bits, default group size (0: per output channel)


def random_engine_params(cfg: ModelConfig, seed: int = 0, fuse: bool = True, quantize: str = "",
                         group_size: int | None = None) -> engine.EngineParams:
  """N(0, 0.02) matrices and unit norm weights, per layer, in the compute dtype (and the fused
  decode layout, `engine.fuse_layer`, unless `fuse` is False); with `quantize` ("int8" or "int4")
  the block projections quantized by round-to-nearest."""
  from llama_jax.quantize.grid import Grid
  from llama_jax.quantize.rtn import quantize_weight
  if quantize and quantize not in QUANTIZE:
    raise ValueError(f"--quantize must be int8 or int4, got {quantize!r}")
  draw = jax.jit(lambda key, shape: (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(cfg.dtype),
                 static_argnums=1)
  ones = jax.jit(lambda shape: jnp.ones(shape, cfg.dtype), static_argnums=0)
  grid = None
  if quantize:
    bits, default_group = QUANTIZE[quantize]
    grid = Grid(bits, default_group if group_size is None else group_size)
  quantized = jax.jit(lambda key, shape, n_in, name: quantize_weight(
      jax.random.normal(key, shape, jnp.float32) * 0.02, grid, n_in, name=name), static_argnums=(1, 2, 3))
  counter = iter(range(1 << 30))

  def make(path, leaf):
    shape = leaf.shape
    name = getattr(path[-1], "key", None)
    key = jax.random.key(seed * 100003 + next(counter))
    if name == "weight":  # RMSNorm
      return ones(shape)
    if grid is not None and name in M.PROJECTIONS:
      return quantized(key, shape, M.PROJECTIONS[name][1], name)
    return draw(key, shape)

  shapes = nn.unbox(param_shapes(cfg))
  block = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), shapes["layers"]["block"])
  top = {k: v for k, v in shapes.items() if k != "layers"}
  fused = jax.jit(engine.fuse_layer) if fuse else (lambda layer: layer)
  return engine.EngineParams(
      jax.tree_util.tree_map_with_path(make, top),
      tuple(fused(jax.tree_util.tree_map_with_path(make, block)) for _ in range(cfg.n_layers)))


def bench_decode(config, batch_size: int, prompt_len: int, new_tokens: int, repeats: int = 5,
                 profile_dir: str = "", fuse: bool = True, quantize: str = "",
                 group_size: int | None = None) -> dict:
  """`config` is a training config (its `model` block). With `profile_dir`, a jax.profiler trace
  of the timed repeats only."""
  t_start = time.perf_counter()
  cfg = ModelConfig.from_dict(config.model)
  if prompt_len < 1 or new_tokens < 1:
    raise ValueError(f"prompt_len and new_tokens must be >= 1, got {prompt_len} and {new_tokens}")
  if prompt_len + new_tokens - 1 > cfg.max_seq_len:
    raise ValueError(f"prompt_len {prompt_len} + new_tokens {new_tokens} does not fit the model's context "
                     f"of {cfg.max_seq_len} tokens (the last new token needs no slot: at most "
                     f"{cfg.max_seq_len - prompt_len + 1} new tokens)")
  params = jax.block_until_ready(random_engine_params(cfg, fuse=fuse, quantize=quantize,
                                                      group_size=group_size))
  init_s = time.perf_counter() - t_start
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, (batch_size, prompt_len)).tolist()
  batch = make_batch(cfg, prompts, list(range(batch_size)), new_tokens)
  b = batch.tokens.shape[0]
  args = (jnp.asarray(batch.tokens), jnp.asarray(batch.prompt_lengths), jnp.asarray(batch.limits),
          jax.random.split(jax.random.key(0), b),
          jax.tree.map(jnp.asarray, SamplingParams.make(b)), jnp.asarray([-1], jnp.int32))
  until = jnp.array(batch.budget, jnp.int32)

  def run():
    t0 = time.perf_counter()
    state = jax.block_until_ready(engine.prefill(cfg, params, *args, cache_len=batch.cache_len,
                                                 budget=batch.budget))
    t1 = time.perf_counter()
    state = jax.block_until_ready(engine.decode(cfg, params, state, until))
    return t1 - t0, time.perf_counter() - t1, state

  t0 = time.perf_counter()
  run()
  compile_s = time.perf_counter() - t0
  prefill_s, decode_s = [], []
  with profiled(profile_dir):
    for _ in range(repeats):
      p, d, state = run()
      prefill_s.append(p)
      decode_s.append(d)
  steps = int(state.steps)  # the first token comes from the prefill
  made = np.asarray(state.lengths)[:batch_size]
  if int(made.min()) != new_tokens:
    raise RuntimeError(f"rows made {made.min()}..{made.max()} tokens, not {new_tokens}")
  p, d = float(np.median(prefill_s)), float(np.median(decode_s))
  weight_bytes = projection.nbytes(params)
  embedding = params.top["tok_embeddings"]
  kv_bytes = (2 * cfg.n_layers * b * batch.cache_len * cfg.n_kv_heads * cfg.head_dim
              * jnp.dtype(cfg.dtype).itemsize)
  # A step reads every weight but the embedding table (of which it gathers B rows), and the cache.
  step_bytes = weight_bytes - projection.nbytes(embedding) + kv_bytes
  if cfg.tie_embeddings:
    step_bytes += projection.nbytes(embedding)
  bandwidth = peak_bandwidth(jax.devices()[0])
  # Prefill model FLOPs: the forward third of train.metrics' count (2N + 2LTD a token, causal
  # attention over the prompt), less the output head, which runs on each row's last token only.
  per_token = metrics.flops_per_token(cfg, prompt_len) / 3 - 2 * cfg.dim * cfg.vocab_size
  peak = metrics.peak_flops(jax.devices()[0], cfg.dtype)
  prefill_mfu = batch_size * prompt_len * per_token / p / (peak * jax.device_count()) if peak else None
  return {"batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens, "fused": fuse,
          # "pallas": the fused blocks; "attention": XLA's matmuls around the fused attention kernel
          "decode_kernels": ("pallas" if engine.fused_blocks(cfg, params, b) else
                             "attention" if engine.fused_attention(cfg, params) else "xla"),
          # the kernels' settings of the time (decode_block's module constants)
          "kernel_settings": {"batch_kernels": sorted(decode_block.BATCH_KERNELS),
                              "attention_split": decode_block.ATTENTION_SPLIT},
          "dtype": cfg.dtype, "quantize": quantize or "none", "cache_len": batch.cache_len,
          "weight_gb": round(weight_bytes / 1e9, 3), "step_read_gb": round(step_bytes / 1e9, 3),
          "floor_ms_per_step": round(1000 * step_bytes / bandwidth, 3) if bandwidth else None,
          "prefill_s": round(p, 5), "prefill_tokens_per_s": round(batch_size * prompt_len / p, 1),
          "prefill_mfu": round(prefill_mfu, 4) if prefill_mfu else None,
          "decode_s": round(d, 5), "decode_ms_per_step": round(1000 * d / steps, 3) if steps else None,
          "decode_tokens_per_s": round(batch_size * steps / d, 1) if steps else None,
          "total_tokens_per_s": round(batch_size * new_tokens / (p + d), 1),
          # The greedy tokens drawn (rows of the same weights, prompts and settings compare across
          # processes and XLA flags): the first 12 hex digits of their SHA-1.
          "tokens_sha1": hashlib.sha1(np.asarray(state.tokens)[:batch_size].tobytes()).hexdigest()[:12],
          "init_s": round(init_s, 1), "compile_s": round(compile_s, 1),
          "process_s": round(time.perf_counter() - t_start, 1), **device_info()}
