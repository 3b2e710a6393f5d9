"""Packing documents into fixed windows: the GPT/LLaMA recipe of concatenating tokenised documents
(each BOS ... EOS) and cutting the stream into windows of seq_len + 1 tokens, inputs = window[:-1],
targets = window[1:]. Every token of every document lands in exactly one window; a document cut at
a window's end continues at the start of the next.

With `document_attention`, each row also carries segment ids (1, 2, ... numbering the document
pieces within the row) and positions that restart at 0 at each piece, so attention and rotary
positions stay inside documents (as T5/seqio packing); the target that crosses from one document
into the next (EOS -> BOS) is masked out of the loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llama_jax.data.errors import DataError
from llama_jax.data.mixture import Mixture


class Packer:

  def __init__(self, mixture: Mixture, rows: int, seq_len: int, document_attention: bool):
    self.mixture, self.rows, self.seq_len = mixture, rows, seq_len
    self.document_attention = document_attention
    self.partial: tuple[int, int] | None = None  # (source, tokens of its last document already used)
    self.emitted = np.zeros(len(mixture.names), np.int64)  # tokens put into batches, per source

  def get_state(self) -> dict[str, Any]:
    return {"mixture": self.mixture.get_state(), "partial": list(self.partial) if self.partial else None,
            "emitted": {n: int(t) for n, t in zip(self.mixture.names, self.emitted)}}

  def set_state(self, state: dict[str, Any]) -> None:
    self.mixture.set_state(state["mixture"])
    self.partial = tuple(state["partial"]) if state["partial"] else None
    self.emitted[:] = [state["emitted"][n] for n in self.mixture.names]

  def source_tokens(self) -> dict[str, int]:
    return {n: int(t) for n, t in zip(self.mixture.names, self.emitted)}

  def next_batch(self) -> dict[str, np.ndarray] | None:
    """The next batch, or None when the sources are exhausted (a last incomplete batch is dropped)."""
    need = self.rows * (self.seq_len + 1)
    pieces, sources, total = [], [], 0
    offset = 0  # where the first piece starts within its document
    if self.partial is not None:
      source, offset = self.partial
      pieces.append(self.mixture.streams[self.mixture.names[source]].last_doc()[offset:])
      sources.append(source)
      total = len(pieces[0])
    while total < need:
      item = self.mixture.next_doc()
      if item is None:
        if not self.mixture.taken.any():
          raise DataError("no documents in any source of this split (for this process): "
                          + ", ".join(self.mixture.names))
        return None
      sources.append(item[0])
      pieces.append(item[1])
      total += len(item[1])
      offset = 0
    used = len(pieces[-1]) - (total - need)  # tokens of the last piece that fit
    self.partial = (sources[-1], offset + used) if used < len(pieces[-1]) else None
    lengths = np.array([len(p) for p in pieces])
    lengths[-1] = used
    np.add.at(self.emitted, sources, lengths)
    window = np.concatenate(pieces)[:need].reshape(self.rows, self.seq_len + 1)
    return self._batch(window, lengths)

  def _batch(self, window: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    rows, t = self.rows, self.seq_len
    batch = {"inputs": np.ascontiguousarray(window[:, :-1]),
             "targets": np.ascontiguousarray(window[:, 1:])}
    if not self.document_attention:
      batch["positions"] = np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy()
      batch["segment_ids"] = np.zeros((rows, t), np.int32)
      batch["loss_mask"] = np.ones((rows, t), np.float32)
      return batch
    piece = np.repeat(np.arange(len(lengths)), lengths).reshape(rows, t + 1)  # (B, T+1)
    segment = piece - piece[:, :1] + 1  # 1, 2, ... within each row
    index = np.arange(t + 1)
    starts = np.ones((rows, t + 1), bool)
    starts[:, 1:] = segment[:, 1:] != segment[:, :-1]
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)  # where each token's piece begins
    batch["positions"] = (index - first)[:, :-1].astype(np.int32)
    batch["segment_ids"] = segment[:, :-1].astype(np.int32)
    batch["loss_mask"] = (~starts[:, 1:]).astype(np.float32)  # target in the input's document
    return batch
