"""Extending a sentencepiece vocabulary with the pieces of a second model, as Chinese-LLaMA-Alpaca
extended LLaMA's (scripts/merge_tokenizer/merge_tokenizers.py: append, through the ModelProto, every
piece of the second model that the base lacks), and resizing a checkpoint's embedding and output
rows to match, the new rows set to the mean of the old ones (so new tokens start as an "average
token" rather than noise: Hewitt 2021, "Initializing new word embeddings for pretrained LMs").

The appended pieces get scores below every base piece, in the second model's order, so the BPE
merges of the base vocabulary keep their priority: while a merge of base pieces applies, it is the
one made. Text is tokenised exactly as before where the base's merges end with no two neighbouring
pieces forming a new piece; elsewhere the new pieces merge further (coarser tokens: a word the
base spelled in short pieces may become one new token), as in Chinese-LLaMA-Alpaca's merged
tokenizer. A checkpoint resized to the merged vocabulary therefore meets new, mean-initialised
ids on some text it used to see in base pieces: fine-tune it before relying on those.
"""

from __future__ import annotations

import os

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2


def read_proto(path: str) -> "sp_pb2.ModelProto":
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no sentencepiece model at {path}")
  proto = sp_pb2.ModelProto()
  with open(path, "rb") as f:
    try:
      proto.ParseFromString(f.read())
    except Exception:  # protobuf's DecodeError
      raise ValueError(f"{path}: not a sentencepiece model") from None
  if not proto.pieces:
    raise ValueError(f"{path}: not a sentencepiece model (no pieces)")
  return proto


def merge(base_path: str, add_path: str, output_path: str) -> tuple[int, int]:
  """Writes base + the new pieces of `add_path` to `output_path`; returns (base size, new size)."""
  base, other = read_proto(base_path), read_proto(add_path)
  present = {p.piece for p in base.pieces}
  lowest = min(p.score for p in base.pieces)
  kinds = (sp_pb2.ModelProto.SentencePiece.NORMAL, sp_pb2.ModelProto.SentencePiece.USER_DEFINED)
  n_base = len(base.pieces)
  for p in sorted(other.pieces, key=lambda p: -p.score):  # the other model's merge order
    if p.type in kinds and p.piece not in present:
      new = base.pieces.add()
      new.piece, new.type = p.piece, p.type
      new.score = lowest - (len(base.pieces) - n_base)  # below every base piece, in order
      present.add(p.piece)
  base.trainer_spec.vocab_size = len(base.pieces)
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  with open(output_path, "wb") as f:
    f.write(base.SerializeToString())
  return n_base, len(base.pieces)


def resize_rows(params: dict, vocab_size: int) -> dict:
  """tok_embeddings (V, D) and output (D, V) grown to `vocab_size`; new rows = the mean old row."""
  params = dict(params)
  emb = np.asarray(params["tok_embeddings"])
  extra = vocab_size - emb.shape[0]
  if extra < 0:
    raise ValueError(f"cannot shrink the vocabulary from {emb.shape[0]} to {vocab_size}")
  mean = emb.astype(np.float32).mean(0, keepdims=True).astype(emb.dtype)  # (1, D)
  params["tok_embeddings"] = np.concatenate([emb, np.repeat(mean, extra, 0)], 0)  # (V', D)
  if "output" in params:
    out = np.asarray(params["output"])
    mean = out.astype(np.float32).mean(1, keepdims=True).astype(out.dtype)  # (D, 1)
    params["output"] = np.concatenate([out, np.repeat(mean, extra, 1)], 1)  # (D, V')
  return params
