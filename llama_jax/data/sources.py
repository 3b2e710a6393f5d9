"""A source's tokenised document stream: its files' records, split between processes, read in
chunks, tokenised with BOS/EOS per document, resumable at any record.

A record's place is (epoch, file, record, byte offset), so a stream can be restarted exactly where a
checkpoint left it: plain `.jsonl` seeks to the byte offset, compressed files skip lines.
"""

from __future__ import annotations

import itertools
import logging
import os
import zlib
from typing import Any, Callable, Iterator

import numpy as np

from llama_jax.data import conversations
from llama_jax.data.errors import DataError
from llama_jax.data.records import (CONVERSATION_FORMATS, MAX_WARNINGS, BadRecord, file_format,
                                    file_key, parse, records)

log = logging.getLogger("llama_jax.data")

# A stream's first chunk after a start or a resume: the first batch waits for what it needs, not for
# a whole data.chunk_chars (1 MiB of a 500-line corpus is 37 epochs of it, 0.8 s; the holdout split
# of every 10th record read 10 MiB, 1.4 s, at each evaluation). Chunks then double up to chunk_chars.
FIRST_CHUNK_CHARS = 1 << 14


class SourceStream:
  """One source's documents for one split and one process, read in chunks of about `chunk_chars`
  characters and tokenised in one batch call per chunk (the tokenizer's threads), with BOS/EOS per
  document. The first chunk is FIRST_CHUNK_CHARS, and each next one twice the last, up to
  `chunk_chars`; the documents and their order do not depend on the chunks.

  `select(file_key, record) -> bool` picks the records of this split; of those, this process takes
  every `process_count`-th (counted within the epoch, over all files in the epoch's order), so the
  processes' shares are disjoint and together cover the split. With `shard_files`, it takes every
  `process_count`-th file of the epoch's order instead and never opens the others (less reading
  when there are many files; the shares are balanced only as far as the files are).
  """

  def __init__(self, name: str, files: list[str], fmt: str, field: str, epochs: int, seed: int,
               tokenizer, select: Callable[[int, int], bool], process_index: int = 0,
               process_count: int = 1, chunk_chars: int = 1 << 20, on_bad_record: str = "warn",
               num_threads: int = 0, events: list[str] | None = None, shard_files: bool = False):
    self.name, self.files, self.field, self.epochs, self.seed = name, files, field, epochs, seed
    self.record_format = fmt if fmt in CONVERSATION_FORMATS else "text"
    self.formats = [file_format(f, fmt) for f in files]
    self.keys = [file_key(f) for f in files]
    self.tokenizer, self.select = tokenizer, select
    self.process_index, self.process_count = process_index, process_count
    self.shard_files = shard_files and process_count > 1
    if int(chunk_chars) < 1:
      raise DataError(f"data.chunk_chars must be >= 1 (characters read per tokenizer call), got {chunk_chars}")
    self.chunk_chars, self.on_bad_record = int(chunk_chars), on_bad_record
    self.num_threads = num_threads or (os.cpu_count() or 1)
    self.events = events if events is not None else []
    self._orders: dict[int, np.ndarray] = {}
    self._live: tuple[dict, Iterator] | None = None  # an open reader and the position it is at
    self.set_state({"pos": self.start_position(), "consumed": 0})

  @staticmethod
  def start_position() -> dict[str, int]:
    # seen: selected records so far this epoch (the sharding counter); docs: this process's
    # documents so far this epoch (0 at an epoch's end means none: the source is empty for it).
    return dict(epoch=0, file=0, record=0, offset=0, seen=0, docs=0, bad=0, done=0)

  def order(self, epoch: int) -> np.ndarray:
    """The files' order in an epoch: shuffled per epoch by the seed, the same on every process."""
    if epoch not in self._orders:
      rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode()), epoch])
      self._orders = {epoch: rng.permutation(len(self.files))}
    return self._orders[epoch]

  # State: where the current chunk starts, the chunk size it was read with, and how many of its
  # documents were taken. The chunk itself is not saved: reading from a position is deterministic,
  # so set_state reads it again, with the size it was read with (a run resumed with another
  # data.chunk_chars reads with it from the next chunk on: the count taken points into this one).
  def get_state(self) -> dict[str, Any]:
    return {"pos": dict(self.chunk_pos), "consumed": self.consumed, "chunk_chars": self.chunk_read_with}

  def set_state(self, state: dict[str, Any]) -> None:
    self.chunk_pos, self.consumed = dict(state["pos"]), int(state["consumed"])
    self.chunk = self.next_pos = None
    self.chunk_read_with = min(FIRST_CHUNK_CHARS, self.chunk_chars)
    if self.consumed:  # states saved before the field: the run's size, as every chunk then had
      self.chunk_read_with = int(state.get("chunk_chars", self.chunk_chars))
      self._load_chunk()

  @property
  def bad_records(self) -> int:
    return (self.next_pos or self.chunk_pos)["bad"]

  @property
  def truncated_turns(self) -> int:
    """Conversation turns cut to fit a window so far (sft.ConversationStream counts them)."""
    return (self.next_pos or self.chunk_pos).get("truncated", 0)

  def last_mask(self) -> np.ndarray | None:
    """Which tokens of `last_doc` count as targets in the loss; None: all of them (pretraining)."""
    return None

  def last_doc(self) -> np.ndarray:
    """The document most recently returned by `next_doc` (the packer resumes a split one from it)."""
    tokens, starts, ends = self.chunk
    return tokens[starts[self.consumed - 1]:ends[self.consumed - 1]]

  def next_doc(self) -> np.ndarray | None:
    """The next document's tokens (BOS ... EOS), or None when the source is exhausted."""
    while True:
      if self.chunk is None:
        if self.chunk_pos["done"]:
          return None
        self._load_chunk()
      if self.consumed < len(self.chunk[1]):
        self.consumed += 1
        return self.last_doc()
      self.chunk_pos, self.consumed, self.chunk = self.next_pos, 0, None
      self.chunk_read_with = min(2 * self.chunk_read_with, self.chunk_chars)

  def _load_chunk(self) -> None:
    texts, self.next_pos = self.read_texts(self.chunk_pos, self.chunk_read_with)
    self.chunk = self._encode(texts)

  def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All documents of a chunk as one int32 array, each with the tokenizer's BOS (if it adds one)
    and EOS, and each one's [start, end)."""
    ids = self.tokenizer.encode_batch(texts, bos=True, eos=True, num_threads=self.num_threads) if texts else []
    lens = np.fromiter(map(len, ids), np.int64, count=len(ids))
    ends = np.cumsum(lens)
    tokens = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(ends[-1]) if len(ends) else 0)
    return tokens, ends - lens, ends

  def parse_record(self, fmt: str, raw: Any, path: str, record: int) -> Any:
    """The document of a raw record (None or empty: skipped silently); raises BadRecord with the reason.
    A conversation source read here (by the tokenizer trainer) gives the conversation's text."""
    if self.record_format == "text":
      return parse(fmt, raw, self.field)
    messages = conversations.parse_conversation(self.record_format, raw)
    return None if messages is None else conversations.plain_text(messages)

  def record_chars(self, doc: Any) -> int:
    return len(doc)

  def _bad(self, pos: dict, path: str, fmt: str, record: int, reason: str) -> None:
    where = f"{path} row {record}" if fmt == "parquet" else f"{path}:{record + 1}"
    if self.on_bad_record == "error":
      raise DataError(f"{where}: {reason} (source {self.name})")
    pos["bad"] += 1
    if pos["bad"] <= MAX_WARNINGS:
      msg = f"skipped a bad record at {where}: {reason} (source {self.name})"
      if pos["bad"] == MAX_WARNINGS:
        msg += "; further bad records of this source are counted, not logged"
      log.warning(msg)
      self.events.append(msg)

  def _reader(self, pos: dict) -> Iterator:
    """A record reader at `pos`, reusing the open one when it is exactly there (sequential reads)."""
    if self._live is not None and self._live[0] == pos:
      return self._live[1]
    i = int(self.order(pos["epoch"])[pos["file"]])
    return records(self.files[i], self.formats[i], self.field, pos["record"], pos["offset"])

  def read_texts(self, pos: dict, chunk_chars: int | None = None) -> tuple[list[str], dict]:
    """The texts of one chunk of `chunk_chars` (default: the stream's) from `pos` (a copy is
    advanced and returned with them)."""
    chunk_chars = chunk_chars or self.chunk_chars
    pos = dict(pos)
    texts, chars = [], 0
    while chars < chunk_chars:
      if pos["file"] >= len(self.files):  # the end of an epoch
        if pos["docs"] == 0:
          pos["done"] = 1
          self.events.append(f"source {self.name} has no documents for this split and process "
                             f"({self.process_index} of {self.process_count}); it is left out")
          break
        if self.epochs and pos["epoch"] + 1 >= self.epochs:
          pos["done"] = 1
          break
        pos.update(epoch=pos["epoch"] + 1, file=0, record=0, offset=0, seen=0, docs=0)
        continue
      if self.shard_files and pos["file"] % self.process_count != self.process_index:
        pos.update(file=pos["file"] + 1, record=0, offset=0)
        continue
      i = int(self.order(pos["epoch"])[pos["file"]])
      path, fmt, key = self.files[i], self.formats[i], self.keys[i]
      reader = self._reader(dict(pos))
      self._live = None
      full = False
      for record, offset, raw in reader:
        pos["record"], pos["offset"] = record + 1, offset
        if not self.select(key, record):
          continue
        pos["seen"] += 1
        if not self.shard_files and (pos["seen"] - 1) % self.process_count != self.process_index:
          continue
        try:
          text = self.parse_record(fmt, raw, path, record)
        except BadRecord as e:
          self._bad(pos, path, fmt, record, str(e))
          continue
        if text:
          texts.append(text)
          chars += self.record_chars(text)
          pos["docs"] += 1
          if chars >= chunk_chars:
            full = True
            break
      if full:
        self._live = (dict(pos), reader)
        break
      pos.update(file=pos["file"] + 1, record=0, offset=0)
    return texts, pos
