"""One source's documents cut into windows of seq_len + 1 tokens: the GPT/LLaMA recipe of
concatenating tokenised documents (each BOS ... EOS) and cutting the stream, inputs = window[:-1],
targets = window[1:]. Each source is cut in its own stream (the mixture then picks whole rows), so
every token of every document lands in exactly one window per epoch; a document cut at a window's
end continues at the start of that source's next window. Only a source's very last window (at its
epoch limit) can be short: it is padded, with the loss masked there.

Conversation sources (`sft`) place whole documents instead: a piece that does not fit in what is
left of a window starts the next one and the rest is padding, so a conversation is never cut
between windows (its pieces already fit one); their documents carry a loss mask (the assistant's
tokens), which travels with the window.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
