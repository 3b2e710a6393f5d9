"""Meta's LLaMA checkpoints: `params.json` + `consolidated.NN.pth`, in as our parameters.

Meta's `llama/model.py` trains with fairscale model parallelism, and each `consolidated.NN.pth`
holds one rank's slices: column-parallel layers (wq wk wv w1 w3 output) are split on dim 0 of the
(out, in) matrix, row-parallel ones (wo w2) on dim 1, `ParallelEmbedding` on dim 1 (LLaMA 3's
`VocabParallelEmbedding` on dim 0: told apart by the shape), and norms are replicated. Merged,
the names map onto Hugging Face's, as transformers' `convert_llama_weights_to_hf.py` does, with the
one real change: Meta's rotary embedding rotates interleaved pairs (2i, 2i+1) of each head, ours
(Hugging Face's) rotates halves (i, i + H/2), so the rows of wq and wk are permuted per head.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Iterator

import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.convert import CheckpointError, layout, torch_io

log = logging.getLogger("llama_jax")

PARAMS = "params.json"
TOKENIZER = "tokenizer.model"
_SHARD = re.compile(r"consolidated\.(\d+)\.pth$")
# fairscale's split of each tensor across model-parallel ranks; absent: replicated.
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str | None:
  """The Hugging Face name of a Meta tensor; None for buffers we recompute (rope.freqs)."""
  if name == "rope.freqs":
    return None
  if name in _TOP:
    return _TOP[name]
  m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
  if m and m.group(2) in _NAMES:
    return f"model.layers.{m.group(1)}.{_NAMES[m.group(2)]}"
  return name  # unknown: the assembler names it in its error


def interleaved_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Rows of a (heads * H, D) projection reordered per head from Meta's rotary pairs (2i, 2i+1)
  to Hugging Face's halves (i, i + H/2): transformers' `permute` in convert_llama_weights_to_hf."""
  rows, d = w.shape
  h = rows // n_heads
  return w.reshape(n_heads, h // 2, 2, d).transpose(0, 2, 1, 3).reshape(rows, d)


def read_params(directory: str) -> dict:
  file = os.path.join(directory, PARAMS)
  try:
    with open(file) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{directory}: no {PARAMS} (not a Meta checkpoint)") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def _release_context(params: dict) -> int:
  """The context a release was trained with; Meta's params.json does not say. Told apart by what it
  does say, as transformers' converter is told by its --llama_version: LLaMA 1 by its norm_eps of
  1e-6 (2048), Code Llama by rope_theta 1e6 (16384), Llama 3.1 and 3.2 by use_scaled_rope (131072),
  Llama 3 by rope_theta 5e5 (8192), and LLaMA 2 (norm_eps 1e-5, rope_theta 1e4) 4096."""
  theta = float(params.get("rope_theta", 10000.0))
  if params.get("use_scaled_rope"):  # Llama 3.1 and 3.2
    return 131072
  if theta >= 1e6:
    return 16384
  if theta >= 5e5:
    return 8192
  return 2048 if float(params.get("norm_eps", 1e-5)) < 5e-6 else 4096


def _scaled_rope(params: dict, file: str) -> dict:
  """Llama 3.1's and 3.2's `use_scaled_rope`: Meta's `apply_scaling` (llama-models), whose factor
  (`rope_scaling_factor`, 8 unless the file says) and high-frequency factor (`high_freq_factor`, 4)
  a params.json may give; the low-frequency factor (1) and the original context (8192) are fixed
  there. Llama 3.2's factor is 32: a params.json without it is read as 3.1's, said aloud."""
  if not params.get("use_scaled_rope"):
    return {}
  if params.get("rope_scaling_factor") is None:
    log.warning("%s: use_scaled_rope without rope_scaling_factor: using 8, Meta's default (Llama 3.1's); "
                "for Llama 3.2 (32) add \"rope_scaling_factor\": 32 to the file", file)
  return dict(rope_scaling="llama3", rope_scaling_factor=float(params.get("rope_scaling_factor") or 8.0),
              rope_high_freq_factor=float(params.get("high_freq_factor") or 4.0),
              rope_low_freq_factor=1.0, rope_original_max_seq_len=8192)


def config_from_meta(params: dict, vocab_size: int, file: str = PARAMS) -> ModelConfig:
  for name in ("dim", "n_layers", "n_heads"):
    if name not in params:
      raise CheckpointError(f"{file}: missing field {name!r}")
  try:
    return ModelConfig(
        dim=int(params["dim"]), n_layers=int(params["n_layers"]), n_heads=int(params["n_heads"]),
        n_kv_heads=int(params["n_kv_heads"]) if params.get("n_kv_heads") else None,
        vocab_size=vocab_size, multiple_of=int(params.get("multiple_of", 256)),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=float(params.get("rope_theta", 10000.0)),
        max_seq_len=int(params.get("max_seq_len") or _release_context(params)), **_scaled_rope(params, file))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{file}: {e}") from None


def shard_files(directory: str) -> list[str]:
  """consolidated.00.pth .. consolidated.NN.pth, with none missing from the run of numbers."""
  found = {}
  for path in glob.glob(os.path.join(directory, "consolidated.*.pth")):
    m = _SHARD.search(os.path.basename(path))
    if m:
      found[int(m.group(1))] = path
  if not found:
    raise CheckpointError(f"{directory}: no consolidated.NN.pth weight files")
  for i in range(max(found) + 1):
    if i not in found:
      raise CheckpointError(f"{directory}: model-parallel shard consolidated.{i:02d}.pth is missing")
  return [found[i] for i in range(len(found))]


class _Shards:
  """The model-parallel shards of one checkpoint, memory-mapped, merged tensor by tensor."""

  def __init__(self, directory: str):
    self.files = shard_files(directory)
    self.states = [torch_io.load(f) for f in self.files]
    self.params = read_params(directory)
    self.param_file = os.path.join(directory, PARAMS)
    first = self.states[0]
    for key in ("tok_embeddings.weight", "layers.0.attention.wq.weight"):
      if key not in first:
        raise CheckpointError(f"{self.files[0]}: missing tensor {key}")
    # How many shards the checkpoint was split into, from one column-parallel tensor's rows, so a
    # missing last shard is caught by name rather than as a shape error later.
    dim = self.params.get("dim")  # missing or odd: config_from_meta names it
    rows = first["layers.0.attention.wq.weight"].shape[0]
    expected = dim // rows if isinstance(dim, int) and rows and dim % rows == 0 else len(self.files)
    if expected != len(self.files):
      missing = os.path.join(directory, f"consolidated.{len(self.files):02d}.pth")
      raise CheckpointError(f"{missing} is missing: layers.0.attention.wq.weight in "
                            f"{os.path.basename(self.files[0])} is 1/{expected} of the model "
                            f"({rows} of {dim} rows), found {len(self.files)} shard(s)")
    # ParallelEmbedding splits the embedding on dim 1 (LLaMA 1, 2), VocabParallelEmbedding on 0.
    emb = first["tok_embeddings.weight"].shape
    self.embed_dim = 0 if len(self.files) > 1 and emb[1] == dim else 1
    vocab = emb[0] * (len(self.files) if self.embed_dim == 0 else 1)
    if int(self.params.get("vocab_size", -1)) > 0 and int(self.params["vocab_size"]) != vocab:
      raise CheckpointError(f"{self.param_file}: vocab_size {self.params['vocab_size']} but "
                            f"tok_embeddings.weight has {vocab} rows")
    self.config = config_from_meta(self.params, vocab, self.param_file)

  def merged(self, name: str) -> np.ndarray:
    parts = []
    for file, state in zip(self.files, self.states):
      if name not in state:
        raise CheckpointError(f"{file}: missing tensor {name}")
      parts.append(torch_io.to_numpy(state[name]))
    key = name.split(".")[-2] if name.endswith(".weight") else name
    dim = self.embed_dim if key == "tok_embeddings" else SPLIT_DIM.get(key)
    if dim is None or len(parts) == 1:
      return parts[0]
    if any(p.ndim != 2 for p in parts):
      raise CheckpointError(f"{self.files[0]}: tensor {name} has shape {parts[0].shape}, expected a matrix")
    return np.concatenate(parts, axis=dim)

  def stream(self) -> Iterator[tuple[str, np.ndarray, str]]:
    cfg = self.config
    where = self.files[0]
    if len(self.files) > 1:
      where = f"{self.files[0]} .. {os.path.basename(self.files[-1])}"
    for name in self.states[0]:
      target = hf_name(name)
      if target is None:
        continue
      w = self.merged(name)
      if name.endswith(("attention.wq.weight", "attention.wk.weight")):
        heads = cfg.n_heads if ".wq." in name else cfg.n_kv_heads
        if w.ndim != 2 or w.shape[0] != heads * cfg.head_dim:
          raise CheckpointError(f"{where}: tensor {name} has shape {w.shape}, expected "
                                f"({heads * cfg.head_dim}, {cfg.dim})")
        w = interleaved_to_halves(w, heads)
      yield target, w, where


def tokenizer_near(directory: str) -> str | None:
  """tokenizer.model in the directory, or beside it (Meta's downloads put it one level up)."""
  parent = os.path.dirname(os.path.abspath(directory))
  for path in (os.path.join(directory, TOKENIZER), os.path.join(parent, TOKENIZER)):
    if os.path.isfile(path):
      return path
  return None


def open_meta(path: str | os.PathLike) -> _Shards:
  directory = os.fspath(path)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: " + ("not a directory" if os.path.exists(directory) else "no such directory"))
  return _Shards(directory)


def load_meta(path: str | os.PathLike, dtype: str = "float32") -> tuple[ModelConfig, dict, str | None]:
  """(config, numpy parameter tree in `dtype`, tokenizer.model path or None)."""
  shards = open_meta(path)
  cfg = shards.config.replace(param_dtype=dtype)
  assembler = layout.Assembler(cfg, os.fspath(path), dtype=layout.np_dtype(dtype))
  params = assembler.add_all(shards.stream()).finish()
  return cfg, params, tokenizer_near(os.fspath(path))
