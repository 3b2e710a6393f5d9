"""Reading source files one record at a time: formats, globs, raw records and their text.

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
import os
import zlib
from typing import Any, Callable, Iterable, Iterator


from llama_jax.data.errors import DataError

FORMATS = ("txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet")
CONVERSATION_FORMATS = ("sharegpt", "alpaca")  # records of llama_jax.data.conversations, in jsonl files
JSONL = ("jsonl", "jsonl.gz", "jsonl.zst")
MAX_WARNINGS = 10  # bad-record warnings logged per source; the rest are only counted


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


class BadRecord(Exception):
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
  """One jsonl line's value; None for a blank line; raises BadRecord for bytes that are not UTF-8 JSON."""
  if not raw.strip():
    return None
  try:
    return json.loads(raw)
  except UnicodeDecodeError as e:
    raise BadRecord(f"not UTF-8 ({e.reason} at byte {e.start})") from None
  except ValueError as e:
    raise BadRecord(f"not JSON ({e})") from None


def parse(fmt: str, raw: Any, field: str) -> str | None:
  """The document text of a raw record; None for a blank line; raises BadRecord with the reason."""
  if fmt == "txt":
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord(f"not UTF-8 ({e.reason} at byte {e.start})") from None
  if fmt == "parquet":
    if raw is None:
      raise BadRecord(f"null {field!r}")
    if not isinstance(raw, str):
      raise BadRecord(f"{field!r} is {type(raw).__name__}, not text")
    return raw
  obj = parse_json_line(raw)
  if obj is None:
    return None
  if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
    raise BadRecord(f"no text field {field!r}")
  return obj[field]


def write_jsonl_once(path: str, make_records: Callable[[], Iterable[dict]]) -> str:
  """`path`, written on first use as the JSON lines of `make_records()` (under a temporary name,
  then renamed, so that no reader sees half a file); the bundled demos' data."""
  if not os.path.isfile(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      for record in make_records():
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  return path


def file_key(path: str) -> int:
  """A stable number per file (its base name) so the held-out records stay held out when the
  corpus moves or the file order is shuffled."""
  return zlib.crc32(os.path.basename(path).encode())
