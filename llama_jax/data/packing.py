"""Packing documents into fixed windows: the GPT/LLaMA recipe of concatenating tokenised documents
(each BOS ... EOS) and cutting the stream into windows of seq_len + 1 tokens, inputs = window[:-1],
targets = window[1:]. Each source is packed into its own stream (the mixture then picks whole rows),
so every token of every document lands in exactly one window per epoch; a document cut at a
window's end continues at the start of that source's next window. Only a source's very last window
(at its epoch limit) can be short: it is padded, with the loss masked there.

Conversation sources (`sft`) pack whole documents instead: a piece that does not fit in what is
left of a window starts the next one and the rest is padding, so a conversation is never cut
between windows (its pieces already fit one); their documents carry a loss mask (the assistant's
tokens), which travels with the window: loss_mask[t] says whether targets[t] counts.

With `document_attention`, each row also carries segment ids (1, 2, ... numbering the document
pieces within the row, 0 on padding) and positions that restart at 0 at each piece, so attention
and rotary positions stay inside documents (as T5/seqio packing); the target that crosses from one
document into the next (EOS -> BOS) is masked out of the loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llama_jax.data.errors import DataError
from llama_jax.data.mixture import Mixture
from llama_jax.data.sources import SourceStream


class Windows:
  """One source's documents cut into windows of `length` tokens; with `split_docs=False` a document
  that does not fit in the rest of a window waits for the next window (unless the window is empty)."""

  def __init__(self, stream: SourceStream, length: int, pad_id: int, split_docs: bool = True):
    self.stream, self.length, self.pad_id, self.split_docs = stream, length, pad_id, split_docs
    self.offset: int | None = None  # tokens of the stream's last document already used, if unfinished

  def get_state(self) -> dict[str, Any]:
    return {"stream": self.stream.get_state(), "offset": self.offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self.stream.set_state(state["stream"])
    self.offset = state["offset"]

  def _counted(self, start: int) -> np.ndarray:
    """Which tokens of the stream's last document, from `start`, count as targets."""
    mask = self.stream.last_mask()
    if mask is None:
      return np.ones(len(self.stream.last_doc()) - start, bool)
    return mask[start:]

  def next_window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(tokens, piece ids, counted) of the next window, each (length,); piece ids number the
    document pieces 0, 1, ... and are -1 on padding; counted says which tokens count as targets
    (False on padding). None when the source is exhausted."""
    pieces, counted, total, start, held = [], [], 0, 0, False
    if self.offset is not None:
      start = self.offset
      pieces.append(self.stream.last_doc()[start:])
      counted.append(self._counted(start))
      total = len(pieces[0])
    while total < self.length:
      doc = self.stream.next_doc()
      if doc is None:
        break
      if not self.split_docs and pieces and total + len(doc) > self.length:
        held = True  # it starts the next window
        break
      pieces.append(doc)
      counted.append(self._counted(0))
      total, start = total + len(doc), 0
    if not pieces:
      return None
    used = len(pieces[-1]) - max(total - self.length, 0)  # tokens of the last piece that fit
    if held:
      self.offset = 0  # the stream's last document, not used yet
    else:
      self.offset = start + used if used < len(pieces[-1]) else None
    lengths = np.fromiter((len(p) for p in pieces), np.int64, count=len(pieces))
    lengths[-1] = used
    tokens = np.full(self.length, self.pad_id, np.int32)
    ids = np.full(self.length, -1, np.int32)
    counts = np.zeros(self.length, bool)
    n = int(lengths.sum())
    tokens[:n] = np.concatenate(pieces)[:n]
    ids[:n] = np.repeat(np.arange(len(pieces), dtype=np.int32), lengths)
    counts[:n] = np.concatenate(counted)[:n]
    return tokens, ids, counts


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
      item = self.mixture.next_window()
      if item is None:
        if not self.mixture.rows.any():
          raise DataError("no documents in any source of this split (for this process): "
                          + ", ".join(self.mixture.names))
        self.finished = True
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
