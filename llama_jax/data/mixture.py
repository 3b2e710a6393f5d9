"""A deterministic weighted mixture of sources, row by row, with per-source epoch limits.

Each source is cut into its own stream of windows (windows.Windows); each next row of a batch
comes from the active source furthest behind its share: the one with the least
`rows taken / weight` (a weighted round robin). All rows hold seq_len + 1 tokens, so the realised
token shares follow the weights to within one row at any point, however long the documents are
(a 100k-token file becomes consecutive rows of its source, interleaved with the other sources'
rows), and nothing random makes two runs differ. A source that reaches its epoch limit drops out;
the others keep their relative weights (renormalised) and an event says so.

Why not `grain.IterDataset.mix`: it stops the whole mixture as soon as any input is exhausted, where
LLaMA's recipe needs per-source epoch limits (Wikipedia and books about twice) with the rest
renormalised; its choice is also random per element, which makes the realised shares drift.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llama_jax.data.errors import DataError
from llama_jax.data.windows import Windows


class Mixture:

  def __init__(self, sources: dict[str, Windows], weights: dict[str, float], events: list[str]):
    self.sources, self.names = sources, list(sources)
    self.weights = np.array([float(weights[n]) for n in self.names])
    self.events = events
    self.rows = np.zeros(len(self.names), np.int64)  # rows taken per source
    self.active = np.ones(len(self.names), bool)

  def get_state(self) -> dict[str, Any]:
    return {n: {"rows": int(self.rows[i]), "active": bool(self.active[i]),
                "windows": self.sources[n].get_state()} for i, n in enumerate(self.names)}

  def set_state(self, state: dict[str, Any]) -> None:
    for i, n in enumerate(self.names):
      if n not in state:
        raise DataError(f"the data state has no source {n!r} (it has {', '.join(state)}): "
                        "the sources changed since the checkpoint")
      self.rows[i], self.active[i] = state[n]["rows"], state[n]["active"]
      self.sources[n].set_state(state[n]["windows"])

  def shares(self) -> dict[str, float]:
    w = np.where(self.active, self.weights, 0.0)
    return {n: float(x) for n, x in zip(self.names, w / max(w.sum(), 1e-30))}

  def next_window(self) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(source index, tokens, piece ids) of the next row, or None when every source is exhausted."""
    while self.active.any():
      i = int(np.argmin(np.where(self.active, self.rows / self.weights, np.inf)))
      window = self.sources[self.names[i]].next_window()
      if window is not None:
        self.rows[i] += 1
        return (i, *window)
      self.active[i] = False
      stream = self.sources[self.names[i]].stream
      if stream.epochs and stream.chunk_pos["epoch"] + 1 >= stream.epochs:
        reason = f"reached its epoch limit ({stream.epochs})"
      else:
        reason = "has no more documents"
      if self.active.any():
        shares = ", ".join(f"{n}={s:.3f}" for n, s in self.shares().items() if s > 0)
        self.events.append(f"source {self.names[i]} {reason} after {self.rows[i]} rows; "
                           f"renormalised weights: {shares}")
      else:
        self.events.append(f"source {self.names[i]} {reason}; every source is exhausted")
    return None
