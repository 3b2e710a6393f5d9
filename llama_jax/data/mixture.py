"""A deterministic weighted mixture of document streams, by tokens, with per-source epoch limits.

Each next document comes from the active source furthest behind its share: the one with the least
`tokens taken / weight` (a token-level weighted round robin). Realised token shares then follow the
weights to within one document at any point, with no randomness to make runs differ. A source that
reaches its epoch limit drops out; the others keep their relative weights (renormalised) and an
event says so.

Why not `grain.IterDataset.mix`: it picks by element count rather than by tokens, and it stops the
whole mixture when any input is exhausted, where LLaMA's recipe needs per-source epoch limits
(Wikipedia and books about twice) with the rest renormalised.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llama_jax.data.sources import SourceStream


class Mixture:

  def __init__(self, streams: dict[str, SourceStream], weights: dict[str, float],
               events: list[str]):
    self.streams, self.names = streams, list(streams)
    self.weights = np.array([float(weights[n]) for n in self.names])
    self.events = events
    self.taken = np.zeros(len(self.names), np.int64)  # tokens of whole documents taken per source
    self.active = np.ones(len(self.names), bool)

  def get_state(self) -> dict[str, Any]:
    return {n: {"taken": int(self.taken[i]), "active": bool(self.active[i]),
                "stream": self.streams[n].get_state()} for i, n in enumerate(self.names)}

  def set_state(self, state: dict[str, Any]) -> None:
    for i, n in enumerate(self.names):
      if n not in state:
        raise ValueError(f"data state has no source {n!r} (sources in it: {', '.join(state)}); "
                         "the sources changed since the checkpoint")
      self.taken[i], self.active[i] = state[n]["taken"], state[n]["active"]
      self.streams[n].set_state(state[n]["stream"])

  def shares(self) -> dict[str, float]:
    w = np.where(self.active, self.weights, 0.0)
    return {n: float(x) for n, x in zip(self.names, w / max(w.sum(), 1e-30))}

  def next_doc(self) -> tuple[int, np.ndarray] | None:
    """(source index, tokens) of the next document, or None when every source is exhausted."""
    while self.active.any():
      deficit = np.where(self.active, self.taken / self.weights, np.inf)
      i = int(np.argmin(deficit))
      doc = self.streams[self.names[i]].next_doc()
      if doc is not None:
        self.taken[i] += len(doc)
        return i, doc
      self.active[i] = False
      stream = self.streams[self.names[i]]
      if stream.epochs and stream.chunk_pos["epoch"] + 1 >= stream.epochs:
        reason = f"reached its epoch limit ({stream.epochs})"
      else:
        reason = "has no more documents"
      if self.active.any():
        shares = ", ".join(f"{n}={s:.3f}" for n, s in self.shares().items() if s > 0)
        self.events.append(f"source {self.names[i]} {reason} after {self.taken[i]} tokens; "
                           f"renormalised weights: {shares}")
      else:
        self.events.append(f"source {self.names[i]} {reason}; every source is exhausted")
    return None
