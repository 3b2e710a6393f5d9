"""What every benchmark reports beside its numbers, and how the small ones time a call."""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np

# Peak memory bandwidth per device (vendors' datasheets), matched as metrics.PEAK_FLOPS is: every
# word of the key in the lower-cased device kind, first match wins.
PEAK_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 2.0e12),
    ("h100 nvl", 3.9e12),
    ("h200 nvl", 4.8e12),
    ("h100", 3.35e12),  # SXM5
    ("h200", 4.8e12),
    ("a100", 2.039e12),  # 80 GB SXM
)


def peak_bandwidth(device: jax.Device) -> float | None:
  """Bytes/s of one device's memory, or None where unknown (a CPU)."""
  words = device.device_kind.lower().replace("-", " ").split()
  for key, value in PEAK_BANDWIDTH:
    if all(any(k in w for w in words) for k in key.split()):
      return value
  return None


def device_info() -> dict:
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return {"device": f"{jax.device_count()}x {device.device_kind}",
          "peak_mem_gb": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)}


def profiled(profile_dir: str):
  """A jax.profiler trace into `profile_dir` around the timed region only (not the compilation
  and autotuning before it, which would swamp a kernel summary); nothing if empty."""
  return jax.profiler.trace(profile_dir) if profile_dir else contextlib.nullcontext()


def median_call_us(fn, *args, reps: int = 50) -> float:
  """Microseconds of `fn(*args)` to its results' readiness, the median of `reps` calls after one that
  compiles and warms up (host-timed: for programs long beside the launch, as the benchmarks' are)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e6)


def time_steps(step, state, batch, warmup: int, steps: int, metric: str, profile_dir: str = ""):
  """(state, seconds of the `warmup` untimed steps (compilation, autotuning), seconds per timed
  step, the last step's `metric`), reading the metric being the host sync that ends the timed
  region; with `profile_dir`, a jax.profiler trace of the timed steps only."""
  t0 = time.perf_counter()
  for _ in range(warmup):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  with profiled(profile_dir):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, batch)
    value = float(m[metric])
    step_s = (time.perf_counter() - t0) / steps
  return state, compile_s, step_s, value
