"""Tokenizers and chat templates.

  Tokenizer  the SentencePiece tokenizer LLaMA uses (BPE with byte fallback, BOS=1, EOS=2)
  chat       conversation templates: how a chat becomes one prompt, and which tokens are answers
  train      training a LLaMA-style SentencePiece model; `extend` merges vocabularies
  __main__   `python -m llama_jax.tokenizer train|extend`
"""

from __future__ import annotations

import os

import sentencepiece as spm


class Tokenizer:
  """A thin wrapper that names LLaMA's conventions: BOS/EOS ids and a pad id that is never a piece."""

  def __init__(self, model_path: str | os.PathLike):
    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"tokenizer model not found: {model_path}")
    self.path = model_path
    self.sp = spm.SentencePieceProcessor(model_file=model_path)
    self.vocab_size: int = self.sp.vocab_size()
    self.bos_id: int = self.sp.bos_id()
    self.eos_id: int = self.sp.eos_id()
    # LLaMA's tokenizer has no pad piece (pad_id -1); padding uses EOS and is masked out anyway.
    self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every id that ends generation."""
    return (self.eos_id,)

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    ids = self.sp.encode(text)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
    batch = self.sp.encode(texts)
    return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in batch]

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])

  def decode_continuation(self, prompt_ids, new_ids) -> str:
    """The text `new_ids` add after `prompt_ids`: the prompt's text followed by it is the whole
    text. Decoded alone, a continuation would lose the space before its first word (SentencePiece
    drops the space that a text's first piece starts with)."""
    prompt = self.decode(prompt_ids)
    whole = self.decode(list(prompt_ids) + list(new_ids))
    return whole[len(prompt):] if whole.startswith(prompt) else self.decode(new_ids)

  def id_to_piece(self, i: int) -> str:
    return self.sp.id_to_piece(int(i))
