"""Any checkpoint this project reads, as one stream of Hugging Face-named tensors.

The converter and the delta tools treat the three formats alike: a `Source` has a config, a
tokenizer, the dtype its weights are stored in, and `stream()`, which yields (Hugging Face name,
array, file) one tensor at a time. Our own Orbax checkpoints are read whole (Orbax restores a tree)
and streamed from memory.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator

import numpy as np

from llama_jax import checkpoint
from llama_jax.config import ModelConfig
from llama_jax.interop import CheckpointError, hf, layout, meta, torch_io


@dataclasses.dataclass
class Source:
  path: str
  kind: str  # "orbax", "hf" or "meta"
  config: ModelConfig
  tokenizer_path: str | None
  stored_dtype: str
  stream: Callable[[], Iterator[tuple[str, np.ndarray, str]]]
  params: Any = None  # the tree itself, for our own checkpoints (already in memory)


def open_source(path: str | os.PathLike) -> Source:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or directory")
  if checkpoint.is_own_checkpoint(path):
    cfg, params, tok = checkpoint.load_model_files(path)

    def stream():
      for e, value in layout.export_stream(cfg, params):
        yield e.name, value(), path
    return Source(path, "orbax", cfg, tok, cfg.param_dtype, stream, params)
  if os.path.isfile(os.path.join(path, hf.CONFIG)):
    cfg, _ = hf.read_config(path)
    return Source(path, "hf", cfg, hf.tokenizer_in(path), hf.stored_dtype(path), lambda: hf.stream(path))
  if os.path.isfile(os.path.join(path, meta.PARAMS)):
    shards = meta.open_meta(path)
    dtype = torch_io.to_numpy(shards.states[0]["tok_embeddings.weight"]).dtype.name  # a view, no copy
    return Source(path, "meta", shards.config, meta.tokenizer_near(path), dtype, shards.stream)
  raise CheckpointError(f"{path}: not a checkpoint (no model_config.json, Hugging Face config.json "
                        "or Meta params.json)")


def load(source: Source, dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """(config, writable numpy tree) in `dtype` (default: as stored). Consumes the source."""
  dtype = dtype or source.stored_dtype
  cfg = source.config.replace(param_dtype=dtype)
  if source.params is not None:
    tree = {}
    for path in layout.our_shapes(source.config):
      # Pop each device array as its host copy is made: one copy of the model at a time, not two.
      leaf = layout.get(source.params, path[:-1]).pop(path[-1])
      layout.put(tree, path, np.array(leaf, dtype=layout.np_dtype(dtype)))
      del leaf
    source.params = None
    return cfg, tree
  params = layout.Assembler(cfg, source.path, dtype=layout.np_dtype(dtype)).add_all(source.stream()).finish()
  return cfg, params
