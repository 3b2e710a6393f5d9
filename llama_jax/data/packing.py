"""Packing rows of the mixture into batches: inputs, targets, positions, segment ids, loss mask.

With `document_attention`, each row also carries segment ids (1, 2, ... numbering the document
pieces within the row, 0 on padding) and positions that restart at 0 at each piece, so attention
and rotary positions stay inside documents (as T5/seqio packing); the target that crosses from one
document into the next (EOS -> BOS) is masked out of the loss. loss_mask[t] says whether
targets[t] counts: padding never does, and a conversation's prompt tokens do not.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llama_jax.data.errors import DataError
from llama_jax.data.mixture import Mixture


class Packer:
  """Batches of `rows` rows from the mixture."""

  def __init__(self, mixture: Mixture, rows: int, seq_len: int, document_attention: bool,
               keep: slice = slice(None)):
    self.mixture, self.rows, self.seq_len = mixture, rows, seq_len
    self.document_attention = document_attention
    self.keep = keep  # the rows this process trains on (data.shard_by="replicated": its block)
    self.emitted = np.zeros(len(mixture.names), np.int64)  # tokens put into batches, per source
    self.finished = False

  def get_state(self) -> dict[str, Any]:
    return {"mixture": self.mixture.get_state(), "finished": self.finished,
            "emitted": {n: int(t) for n, t in zip(self.mixture.names, self.emitted)}}

  def set_state(self, state: dict[str, Any]) -> None:
    self.mixture.set_state(state["mixture"])
    self.finished = bool(state["finished"])
    self.emitted[:] = [state["emitted"][n] for n in self.mixture.names]

  def source_tokens(self) -> dict[str, int]:
    return {n: int(t) for n, t in zip(self.mixture.names, self.emitted)}

  def _next_window(self, what: str):
    """The mixture's next window, or None where every source has ended (the packer is then
    finished); an error where no source ever gave one (`what`: what the sources hold)."""
    item = self.mixture.next_window()
    if item is None:
      if not self.mixture.rows.any():
        raise DataError(f"no {what} in any source of this split (for this process): "
                        + ", ".join(self.mixture.names))
      self.finished = True
    return item

  def next_batch(self) -> dict[str, np.ndarray] | None:
    """The next batch, or None when the sources are exhausted. The last batch is completed with
    padding rows (loss_mask 0), so no token is dropped."""
    if self.finished:
      return None
    length = self.seq_len + 1
    window = np.full((self.rows, length), self.mixture.sources[self.mixture.names[0]].pad_id, np.int32)
    piece = np.full((self.rows, length), -1, np.int32)
    counted = np.zeros((self.rows, length), bool)
    for r in range(self.rows):
      item = self._next_window("documents")
      if item is None:
        if r == 0:
          return None
        break
      source, window[r], piece[r], counted[r] = item
      if r in range(self.rows)[self.keep]:
        self.emitted[source] += int((piece[r] >= 0).sum())
    return self._batch(window[self.keep], piece[self.keep], counted[self.keep])

  def _batch(self, window: np.ndarray, piece: np.ndarray, counted: np.ndarray) -> dict[str, np.ndarray]:
    rows, t = window.shape[0], self.seq_len
    real = counted & (piece >= 0)  # (B, T+1): tokens that count as targets
    batch = {"inputs": np.ascontiguousarray(window[:, :-1]),
             "targets": np.ascontiguousarray(window[:, 1:])}
    if not self.document_attention:
      batch["positions"] = np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy()
      batch["segment_ids"] = np.zeros((rows, t), np.int32)
      batch["loss_mask"] = (real[:, 1:]).astype(np.float32)
      return batch
    segment = piece + 1  # (B, T+1): 1, 2, ... within each row, 0 on padding
    index = np.arange(t + 1)
    starts = np.ones((rows, t + 1), bool)
    starts[:, 1:] = segment[:, 1:] != segment[:, :-1]
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)  # where each token's piece begins
    batch["positions"] = (index - first)[:, :-1].astype(np.int32)
    batch["segment_ids"] = segment[:, :-1].astype(np.int32)
    # The target counts when it is real and in the input's document.
    batch["loss_mask"] = (real[:, 1:] & ~starts[:, 1:]).astype(np.float32)
    return batch
