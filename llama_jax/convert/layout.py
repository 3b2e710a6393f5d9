"""Hugging Face's tensor names and shapes against our parameter tree, and the streaming assembly.

Hugging Face (`transformers/models/llama/modeling_llama.py`) keeps one (out, in) `nn.Linear`
matrix per layer; we keep (in, ...out) matrices stacked on a leading layers axis, so every linear
weight is a transpose and a reshape, embeddings and norms are copies, and the rotary layout is
the same ("rotate half"). Meta's names map onto these after `meta.py` merges shards and undoes
Meta's interleaved rotary layout.

`Assembler` builds the parameter tree from a stream of (Hugging Face name, array) pairs: each
stacked tensor is preallocated once and filled layer by layer, so loading holds one copy of the
model plus the tensor in flight. The same assembler adds or subtracts a stream into an existing
tree, which is all a Vicuna delta is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator

import ml_dtypes
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.convert import CheckpointError

Path = tuple[str, ...]
ATTN = ("layers", "block", "attention")
FFN = ("layers", "block", "feed_forward")
# Vocabulary-sized tensors, which a delta may extend with rows for added tokens.
VOCAB_PATHS = {("tok_embeddings",): 0, ("output",): 1}


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str  # Hugging Face's name, e.g. model.layers.3.self_attn.q_proj.weight
  path: Path  # where it lives in our tree
  layer: int | None  # its index on the stacked layers axis, None for unstacked tensors
  shape: tuple[int, ...]  # Hugging Face's shape
  linear: bool  # (out, in) matrix: ours is its transpose, reshaped; otherwise a plain copy


def entries(cfg: ModelConfig) -> list[Entry]:
  """Every tensor of a Hugging Face LLaMA with this config, in the order transformers writes them."""
  d, n, k, h, f, v = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim, cfg.vocab_size
  per_layer = [
      ("self_attn.q_proj.weight", ATTN + ("wq",), (n * h, d), True),
      ("self_attn.k_proj.weight", ATTN + ("wk",), (k * h, d), True),
      ("self_attn.v_proj.weight", ATTN + ("wv",), (k * h, d), True),
      ("self_attn.o_proj.weight", ATTN + ("wo",), (d, n * h), True),
      ("mlp.gate_proj.weight", FFN + ("w1",), (f, d), True),
      ("mlp.up_proj.weight", FFN + ("w3",), (f, d), True),
      ("mlp.down_proj.weight", FFN + ("w2",), (d, f), True),
      ("input_layernorm.weight", ("layers", "block", "attention_norm", "weight"), (d,), False),
      ("post_attention_layernorm.weight", ("layers", "block", "ffn_norm", "weight"), (d,), False),
  ]
  out = [Entry("model.embed_tokens.weight", ("tok_embeddings",), None, (v, d), False)]
  for i in range(cfg.n_layers):
    out += [Entry(f"model.layers.{i}.{s}", p, i, shape, lin) for s, p, shape, lin in per_layer]
  out.append(Entry("model.norm.weight", ("norm", "weight"), None, (d,), False))
  if not cfg.tie_embeddings:
    out.append(Entry("lm_head.weight", ("output",), None, (v, d), True))
  return out


def our_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
  """Our parameter shapes, (L, ...) for stacked tensors; the tree in common use (model.py)."""
  d, n, k, h, f, v, l = (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim,
                         cfg.vocab_size, cfg.n_layers)
  shapes = {
      ("tok_embeddings",): (v, d), ("norm", "weight"): (d,),
      ATTN + ("wq",): (l, d, n, h), ATTN + ("wk",): (l, d, k, h), ATTN + ("wv",): (l, d, k, h),
      ATTN + ("wo",): (l, n, h, d),
      ("layers", "block", "attention_norm", "weight"): (l, d),
      ("layers", "block", "ffn_norm", "weight"): (l, d),
      FFN + ("w1",): (l, d, f), FFN + ("w3",): (l, d, f), FFN + ("w2",): (l, f, d),
  }
  if not cfg.tie_embeddings:
    shapes[("output",)] = (d, v)
  return shapes


def np_dtype(name: str) -> np.dtype:
  """numpy dtype by name; bfloat16 is ml_dtypes' (JAX's own)."""
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def get(tree: Any, path: Path) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def put(tree: dict, path: Path, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def to_ours(entry: Entry, array: np.ndarray, ours_shape: tuple[int, ...]) -> np.ndarray:
  """A Hugging Face tensor in our per-layer layout (a view where the layout allows one)."""
  return array.T.reshape(ours_shape) if entry.linear else array


def from_ours(entry: Entry, ours: np.ndarray) -> np.ndarray:
  """Our per-layer tensor in Hugging Face's layout."""
  if entry.linear:
    return ours.reshape(entry.shape[::-1]).T  # (in..., out...) -> (in, out) -> (out, in)
  return ours


def hf_tensors(cfg: ModelConfig, path: Path, leaf: np.ndarray) -> Iterator[tuple[Entry, np.ndarray]]:
  """(entry, Hugging Face tensor) for every tensor that our parameter `path` holds (one per layer
  for a stacked parameter), as views of `leaf` where the layout allows."""
  for e in entries(cfg):
    if e.path == path:
      yield e, from_ours(e, leaf if e.layer is None else leaf[e.layer])


def export_stream(cfg: ModelConfig, params: Any) -> Iterator[tuple[Entry, Any]]:
  """(entry, function giving its Hugging Face tensor) for each tensor; the function copies one
  layer's slice to the host only when called, so a device-resident model never lands whole."""
  for e in entries(cfg):
    leaf = get(params, e.path)

    def value(leaf=leaf, e=e):
      part = leaf if e.layer is None else leaf[e.layer]
      return from_ours(e, np.asarray(part))
    yield e, value


class Assembler:
  """Fills (`op='set'`), adds into (`'add'`) or subtracts from (`'rsub'`: tensor - tree) a
  parameter tree, one Hugging Face tensor at a time; `finish()` checks every tensor came."""

  def __init__(self, cfg: ModelConfig, where: str, dtype: Any = np.float32, tree: dict | None = None,
               op: str = "set"):
    self.cfg, self.where, self.op = cfg, where, op
    self.entries = {e.name: e for e in entries(cfg)}
    self.shapes = our_shapes(cfg)
    if tree is None:
      tree = {}
      for path, shape in self.shapes.items():
        put(tree, path, np.empty(shape, dtype))
    self.tree = tree
    self.seen: set[str] = set()

  def add(self, name: str, array: np.ndarray, file: str) -> None:
    e = self.entries.get(name)
    if e is None:
      if name == "lm_head.weight" and self.cfg.tie_embeddings:
        return  # some writers store the tied head too; ours reuses tok_embeddings
      if name.endswith("rotary_emb.inv_freq"):
        return  # a buffer older transformers saved; recomputed from rope_theta
      raise CheckpointError(f"{file}: unexpected tensor {name} (not part of a LLaMA with this config)")
    if tuple(array.shape) != e.shape:
      raise CheckpointError(f"{file}: tensor {name} has shape {tuple(array.shape)}, expected {e.shape}")
    if name in self.seen:
      raise CheckpointError(f"{file}: tensor {name} appears twice")
    leaf = get(self.tree, e.path)
    dst = leaf if e.layer is None else leaf[e.layer]
    if not isinstance(dst, np.ndarray) or not dst.flags.writeable:
      raise TypeError(f"{self.where}: parameter {'/'.join(e.path)} is not a writable numpy array")
    if e.path in VOCAB_PATHS and dst.shape != self.shapes[e.path]:
      raise CheckpointError(f"{file}: tensor {name} has {e.shape[0]} vocabulary rows, the model "
                            f"being combined with it {dst.shape[VOCAB_PATHS[e.path]]}")
    src = to_ours(e, array, dst.shape)
    if self.op == "set":
      dst[...] = src
    elif self.op == "add":
      dst += src.astype(dst.dtype)
    else:
      np.subtract(src.astype(dst.dtype), dst, out=dst)
    self.seen.add(name)

  def add_all(self, stream: Iterable[tuple[str, np.ndarray, str]]) -> "Assembler":
    for name, array, file in stream:
      self.add(name, array, file)
    return self

  def finish(self) -> dict:
    missing = [n for n in self.entries if n not in self.seen]
    if missing:
      more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
      raise CheckpointError(f"{self.where}: missing tensor {missing[0]}{more}")
    return self.tree
