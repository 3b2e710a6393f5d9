"""The safetensors format (Hugging Face), read and written one tensor at a time.

A file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape
and byte range, then the raw bytes (https://github.com/huggingface/safetensors). The library's own
numpy reader has no bfloat16, and its writers want every tensor in memory at once; here reading maps
one tensor at a time (the mapping goes when the array does, so read pages leave the process's
memory) and writing computes the header from shapes first, then streams each tensor's bytes.
Nothing in a safetensors file is executed: the header is JSON and the rest is numbers.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from llama_jax.convert import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the library's own limit


def read_header(path: str) -> tuple[dict, int]:
  """({tensor name: {dtype, shape, data_offsets}}, offset of the data section)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointError(f"{path}: not a safetensors file (shorter than its header)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER, size - 8):
      raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
  header.pop("__metadata__", None)
  start = 8 + n
  for name, info in header.items():
    if not _well_formed(info):
      raise CheckpointError(f"{path}: tensor {name}: its header entry is not {{dtype, shape, data_offsets}} "
                            "of a string and lists of integers")
    begin, end = info["data_offsets"]
    if info["dtype"] not in DTYPES:
      raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    want = DTYPES[info["dtype"]].itemsize * int(np.prod(info["shape"], dtype=np.int64))
    if end - begin != want or start + end > size:
      raise CheckpointError(f"{path}: tensor {name} lies outside the file (truncated?)")
  return header, start


def _well_formed(info) -> bool:
  ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and x >= 0 for x in xs)
  return (isinstance(info, dict) and isinstance(info.get("dtype"), str) and ints(info.get("shape"))
          and ints(info.get("data_offsets")) and len(info["data_offsets"]) == 2)


def tensor_info(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  header, _ = read_header(path)
  return {name: (tuple(info["shape"]), DTYPES[info["dtype"]]) for name, info in header.items()}


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """(name, read-only array) in file order, each mapped from the file on its own."""
  header, start = read_header(path)
  for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
    shape, dtype = tuple(info["shape"]), DTYPES[info["dtype"]]
    if 0 in shape:
      yield name, np.zeros(shape, dtype)
      continue
    yield name, np.memmap(path, dtype=dtype, mode="r", offset=start + info["data_offsets"][0], shape=shape)


def write_file(path: str, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
               produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> int:
  """Writes the tensors `specs` names (name, shape, dtype), asking `produce(name)` for each one's
  values only when its turn comes. Returns the bytes of tensor data written."""
  specs = list(specs)
  header, offset = {}, 0
  for name, shape, dtype in specs:
    nbytes = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
    header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header = {"__metadata__": metadata or {"format": "pt"}, **header}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the library writes it
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, shape, dtype in specs:
      value = np.ascontiguousarray(produce(name), dtype=dtype)
      if value.shape != tuple(shape):
        raise ValueError(f"tensor {name}: produced shape {value.shape}, announced {tuple(shape)}")
      f.write(memoryview(value.reshape(-1).view(np.uint8)))
  os.replace(tmp, path)
  return offset
