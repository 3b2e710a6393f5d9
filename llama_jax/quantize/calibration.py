"""Calibration data for GPTQ: a text as windows of tokens, as the reference takes random
2048-token segments of C4 or WikiText-2 (`datautils.py`), here without overlap."""

from __future__ import annotations

import numpy as np


def windows(tokens, n_samples: int, seq_len: int, seed: int = 0, where: str = "calibration text") -> np.ndarray:
  """(n_samples, seq_len) int32: distinct non-overlapping windows of `tokens`, chosen at random."""
  if n_samples < 1 or seq_len < 2:
    raise ValueError(f"need at least 1 calibration sample of at least 2 tokens, got {n_samples} of {seq_len}")
  tokens = np.asarray(tokens, np.int32)
  available = len(tokens) // seq_len
  if available < n_samples:
    raise ValueError(
        f"{where} encodes to {len(tokens)} tokens, fewer than the {n_samples} x {seq_len} = "
        f"{n_samples * seq_len} that {n_samples} samples of {seq_len} tokens need: give a longer "
        "text, or fewer --calibration_samples or a shorter --calibration_len")
  chosen = np.sort(np.random.default_rng(seed).choice(available, n_samples, replace=False))
  return np.stack([tokens[i * seq_len:(i + 1) * seq_len] for i in chosen])
