"""Quantization time: the real model pass (`quantize.layers`) over random weights of a config's
shape and random calibration tokens.

  python -m llama_jax.bench quantize --config configs/tinyllama_1b.py --bits 4 --method gptq \\
      --group_size 128 --calibration_samples 128 --calibration_len 2048

Reports the whole pass (compilation included: it is part of what a user waits for), the first
block apart from the median of the others (the first one compiles), and the mean relative
reconstruction error of GPTQ and of round-to-nearest (random weights and tokens: a timing run, not
a quality measure).
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import numpy as np

from llama_jax import model as M
from llama_jax import projection
from llama_jax.bench.common import device_info, profiled
from llama_jax.config import ModelConfig
from llama_jax.quantize.grid import Grid
from llama_jax.quantize.layers import Options, quantize_params


def bench_quantize(config, bits: int, method: str, group_size: int, samples: int, seq_len: int,
                   act_order: bool = False, batch_size: int = 8, profile_dir: str = "") -> dict:
  cfg = ModelConfig.from_dict(config.model)
  if seq_len > cfg.max_seq_len:
    raise ValueError(f"--calibration_len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
  grid = Grid(bits, group_size)
  options = Options(method, act_order=act_order, batch_size=batch_size)
  params = jax.block_until_ready(nn.unbox(jax.jit(M.init_params, static_argnums=0)(cfg, jax.random.key(0))))
  tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (samples, seq_len), dtype=np.int32)
  marks: list[tuple[int, float]] = []

  def log(line: str) -> None:  # one line per weight: "layers.<i>.<module>.<name>: ..."
    if line.startswith("layers."):
      marks.append((int(line.split(".")[1]), time.perf_counter()))

  with profiled(profile_dir):  # the whole pass: its compilations are part of the wait, block by block
    start = time.perf_counter()
    quantized, report = quantize_params(cfg, params, grid, options, tokens if method == "gptq" else None,
                                        log=log)
    jax.block_until_ready(quantized)
    seconds = time.perf_counter() - start
  ends = {layer: t for layer, t in marks}  # the last weight of each block
  layer_s = np.diff([start] + [ends[i] for i in sorted(ends)])
  out = {"bits": bits, "method": method, "group_size": group_size, "calibration_samples": samples,
         "calibration_len": seq_len, "act_order": act_order, "seconds": round(seconds, 1),
         "quantized_gb": round(projection.nbytes(quantized) / 1e9, 3),
         "float32_gb": round(projection.nbytes(params) / 1e9, 3)}
  if len(layer_s):
    out.update(first_block_s=round(float(layer_s[0]), 2),
               block_s_median=round(float(np.median(layer_s[1:] if len(layer_s) > 1 else layer_s)), 2))
  if report:
    out["mean_relative_error"] = {m: round(sum(r[m] for r in report) / len(report), 6) for m in ("gptq", "rtn")}
  return {**out, **device_info()}
