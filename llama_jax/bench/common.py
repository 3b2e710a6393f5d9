"""What every benchmark reports beside its numbers."""

from __future__ import annotations

import time

import jax


def time_steps(step, state, batch, warmup: int, steps: int, metric: str):
  """(state, seconds of the `warmup` untimed steps (compilation), seconds per timed step, the last
  step's `metric`), reading the metric being the host sync that ends the timed region."""
  t0 = time.perf_counter()
  for _ in range(warmup):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  value = float(m[metric])
  return state, compile_s, (time.perf_counter() - t0) / steps, value


def device_info() -> dict:
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return {"device": f"{jax.device_count()}x {device.device_kind}",
          "peak_mem_gb": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)}
