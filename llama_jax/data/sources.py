"""Streaming readers of text sources, one record at a time, and a source's tokenised document stream.

Formats (by extension unless the source names one): `.txt` (one document per file), `.jsonl`,
`.jsonl.gz`, `.jsonl.zst` (one JSON object per line, text under `text_field`) and `.parquet`
(column `text_field`, read one row group at a time). The conversation formats "sharegpt" and
"alpaca" (`llama_jax.data.sft`) read the same jsonl files, the container told by the extension.
Nothing reads a whole source: memory is one line, one row group or one .txt file, plus one chunk of
`chunk_chars` characters being encoded.

A record's place is (epoch, file, record, byte offset), so a stream can be restarted exactly where a
checkpoint left it: plain `.jsonl` seeks to the byte offset, compressed files skip lines.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import logging
import os
import zlib
from typing import Any, Callable, Iterator

import numpy as np

from llama_jax.data.errors import DataError

FORMATS = ("txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet")
CONVERSATION_FORMATS = ("sharegpt", "alpaca")  # records of llama_jax.data.sft, in jsonl files
JSONL = ("jsonl", "jsonl.gz", "jsonl.zst")
MAX_WARNINGS = 10  # bad-record warnings logged per source; the rest are only counted

log = logging.getLogger("llama_jax.data")


def file_format(path: str, fmt: str = "") -> str:
  """The container format of a file: `fmt`, or by the extension (conversation formats: jsonl-ish)."""
  if fmt in CONVERSATION_FORMATS:
    container = file_format(path)
    if container not in JSONL:
      raise DataError(f"{path}: format {fmt!r} reads {', '.join('.' + f for f in JSONL)} files, "
                      f"not .{container}")
    return container
  if fmt:
    if fmt not in FORMATS:
      raise DataError(f"unknown format {fmt!r} for {path}; known: "
                      f"{', '.join(FORMATS + CONVERSATION_FORMATS)}")
    return fmt
  for f in sorted(FORMATS, key=len, reverse=True):  # "jsonl.gz" before "jsonl"
    if path.endswith("." + f):
      return f
  raise DataError(f"{path}: cannot tell the format from the extension (one of "
                  f"{', '.join('.' + f for f in FORMATS)}); set the source's format")


def expand(pattern: str) -> list[str]:
  """The files of a path or glob, sorted; a glob that matches nothing is an error naming it."""
  pattern = os.path.expanduser(pattern)
  files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not files:
    raise DataError(f"no files match {pattern!r}")
  return files


class _Bad(Exception):
  pass


def _open_lines(path: str, fmt: str, record: int, offset: int) -> Iterator[tuple[int, int, bytes]]:
  """(record index, byte offset after it or -1, raw line) from record `record` on."""
  if fmt == "jsonl":
    with open(path, "rb") as f:
      f.seek(offset)
      for i, line in enumerate(f, record):
        offset += len(line)
        yield i, offset, line
    return
  if fmt == "jsonl.gz":
    opener = lambda: gzip.open(path, "rb")  # noqa: E731
  else:
    import zstandard
    opener = lambda: io.BufferedReader(  # noqa: E731
        zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
  with opener() as f:
    # Compressed streams cannot seek by record: skip the lines already read.
    for i, line in enumerate(itertools.islice(f, record, None), record):
      yield i, -1, line


def _parquet_rows(path: str, field: str, record: int) -> Iterator[tuple[int, int, Any]]:
  import pyarrow.parquet as pq
  pf = pq.ParquetFile(path)
  if field not in pf.schema_arrow.names:
    raise DataError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
  first = 0
  for g in range(pf.num_row_groups):
    rows = pf.metadata.row_group(g).num_rows
    if first + rows > record:
      values = pf.read_row_group(g, columns=[field]).column(0).to_pylist()
      for i in range(max(record, first), first + rows):
        yield i, -1, values[i - first]
    first += rows


def records(path: str, fmt: str, field: str, record: int = 0,
            offset: int = 0) -> Iterator[tuple[int, int, Any]]:
  """(record index, byte offset after it, raw record) of one file, from `record` on; parse the raw
  record with `parse`. Raw records are read before parsing so unselected ones cost no JSON decode."""
  if fmt == "txt":
    if record == 0:
      with open(path, "rb") as f:
        yield 0, -1, f.read()
  elif fmt == "parquet":
    yield from _parquet_rows(path, field, record)
  else:
    yield from _open_lines(path, fmt, record, offset)


def parse_json_line(raw: bytes | str) -> Any:
  """One jsonl line's value; None for a blank line; raises _Bad for bytes that are not UTF-8 JSON."""
  if not raw.strip():
    return None
  try:
    return json.loads(raw)
  except UnicodeDecodeError as e:
    raise _Bad(f"not UTF-8 ({e.reason} at byte {e.start})") from None
  except ValueError as e:
    raise _Bad(f"not JSON ({e})") from None


def parse(fmt: str, raw: Any, field: str) -> str | None:
  """The document text of a raw record; None for a blank line; raises _Bad with the reason."""
  if fmt == "txt":
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _Bad(f"not UTF-8 ({e.reason} at byte {e.start})") from None
  if fmt == "parquet":
    if raw is None:
      raise _Bad(f"null {field!r}")
    if not isinstance(raw, str):
      raise _Bad(f"{field!r} is {type(raw).__name__}, not text")
    return raw
  obj = parse_json_line(raw)
  if obj is None:
    return None
  if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
    raise _Bad(f"no text field {field!r}")
  return obj[field]


def file_key(path: str) -> int:
  """A stable number per file (its base name) so the held-out records stay held out when the
  corpus moves or the file order is shuffled."""
  return zlib.crc32(os.path.basename(path).encode())


class SourceStream:
  """One source's documents for one split and one process, read in chunks of about `chunk_chars`
  characters and tokenised in one sentencepiece call per chunk, with BOS/EOS per document.

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
    self.chunk_chars, self.on_bad_record = chunk_chars, on_bad_record
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

  # State: where the current chunk starts and how many of its documents were taken. The chunk
  # itself is not saved: reading from a position is deterministic, so set_state reads it again.
  def get_state(self) -> dict[str, Any]:
    return {"pos": dict(self.chunk_pos), "consumed": self.consumed}

  def set_state(self, state: dict[str, Any]) -> None:
    self.chunk_pos, self.consumed = dict(state["pos"]), int(state["consumed"])
    self.chunk = self.next_pos = None
    if self.consumed:
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

  def _load_chunk(self) -> None:
    texts, self.next_pos = self.read_texts(self.chunk_pos)
    self.chunk = self._encode(texts)

  def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All documents of a chunk as one int32 array with BOS/EOS, and each one's [start, end)."""
    tok = self.tokenizer
    ids = tok.sp.encode(texts, num_threads=self.num_threads) if texts else []
    lens = np.fromiter((len(x) + 2 for x in ids), np.int64, count=len(ids))
    ends = np.cumsum(lens)
    starts = ends - lens
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, np.int32)
    body = np.ones(len(tokens), bool)
    body[starts] = body[ends - 1] = False
    tokens[body] = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(body.sum()))
    tokens[starts], tokens[ends - 1] = tok.bos_id, tok.eos_id
    return tokens, starts, ends

  def parse_record(self, fmt: str, raw: Any, path: str, record: int) -> Any:
    """The document of a raw record (None or empty: skipped silently); raises _Bad with the reason.
    A conversation source read here (by the tokenizer trainer) gives the conversation's text."""
    if self.record_format == "text":
      return parse(fmt, raw, self.field)
    from llama_jax.data import sft
    messages = sft.parse_conversation(self.record_format, raw)
    return None if messages is None else sft.plain_text(messages)

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

  def read_texts(self, pos: dict) -> tuple[list[str], dict]:
    """The texts of one chunk from `pos` (a copy is advanced and returned with them)."""
    pos = dict(pos)
    texts, chars = [], 0
    while chars < self.chunk_chars:
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
        except _Bad as e:
          self._bad(pos, path, fmt, record, str(e))
          continue
        if text:
          texts.append(text)
          chars += self.record_chars(text)
          pos["docs"] += 1
          if chars >= self.chunk_chars:
            full = True
            break
      if full:
        self._live = (dict(pos), reader)
        break
      pos.update(file=pos["file"] + 1, record=0, offset=0)
    return texts, pos
