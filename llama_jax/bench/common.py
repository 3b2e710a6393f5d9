"""What every benchmark reports beside its numbers."""

from __future__ import annotations

import jax


def device_info() -> dict:
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return {"device": f"{jax.device_count()}x {device.device_kind}",
          "peak_mem_gb": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)}
