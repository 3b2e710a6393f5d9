"""The tokenizer protocol every backend implements, and the choice of backend from a path.

`Tokenizer(path)` (or `load_tokenizer(path)`) returns the backend that reads what the path holds,
as `pathlib.Path(...)` returns a `PosixPath`: `hf.HFTokenizer` for a tokenizer.json (Hugging Face
`tokenizers`), `spm.SentencePieceTokenizer` for a SentencePiece .model; a folder holding both is
read through its tokenizer.json, as transformers reads it (`files.py` says which files count).

The protocol (what the rest of llama_jax uses):
  encode(text, bos=True, eos=False) -> ids    bos=True: the BOS the tokenizer puts before a
                                               sequence, if any (see each backend); EOS only with
                                               eos=True, also where the tokenizer's files would add
                                               it (add_eos_token, an EOS post-processor): a prompt
                                               or an evaluation context never ends in EOS
  encode_batch(texts, bos, eos, num_threads)   the same for many texts, on several threads
  encode_with_offsets(text) -> [(id, begin, end)]  no BOS/EOS added, special-token strings in the
                                               text become their ids; begin/end are character offsets
  decode(ids) -> str                           special tokens are dropped
  decode_continuation(prompt_ids, new_ids)     the text new_ids add after the prompt
  bos_id (None: the tokenizer has none), add_bos (whether encode(bos=True) starts with it),
  eos_id, eos_ids (every id that ends generation), pad_id,
  vocab_size (the largest id + 1), token_to_id(str) -> int | None, id_to_piece(int) -> str,
  special_tokens_map ({"bos_token": "<s>", ...}: the names a chat template sees), chat_template
  (the folder's Jinja template or None), generation_config (the folder's generation_config.json as
  a dict, {} if none), path (the tokenizer's file), save(directory).
"""

from __future__ import annotations

import os
from typing import Sequence

from llama_jax.tokenizer import files
from llama_jax.tokenizer.files import TokenizerError


class Tokenizer:
  """Base of the backends; `Tokenizer(path)` picks the backend for the path (see the module doc)."""

  _backends: list[type] = []  # subclasses, in the order `reads` is asked

  path: str
  vocab_size: int
  bos_id: int | None
  add_bos: bool
  eos_id: int | None
  pad_id: int
  eos_ids: tuple[int, ...]
  chat_template: str | None
  generation_config: dict
  special_tokens_map: dict[str, str]

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    Tokenizer._backends.append(cls)

  def __new__(cls, path=None, *args, **kwargs):
    if cls is Tokenizer:
      if path is None:
        raise TypeError("Tokenizer(path): give a tokenizer.json, a SentencePiece .model or a folder")
      found = files.find(path)
      readers = [b for b in Tokenizer._backends if b.reads(found)]
      if not readers:
        raise TokenizerError(f"{path}: no tokenizer backend reads it")
      cls = readers[0]
    return super().__new__(cls)

  @classmethod
  def reads(cls, found: files.TokenizerFiles) -> bool:
    """Whether this backend is the one for `found` (the files of a path); a subclass that is not a
    backend (a test's stand-in) reads nothing."""
    return False

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    return self.encode_batch([text], bos=bos, eos=eos, num_threads=1)[0]

  def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                   num_threads: int = 0) -> list[list[int]]:
    raise NotImplementedError

  def encode_with_offsets(self, text: str) -> list[tuple[int, int, int]]:
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError

  def token_to_id(self, token: str) -> int | None:
    raise NotImplementedError

  def id_to_piece(self, i: int) -> str:
    raise NotImplementedError

  def save(self, directory: str | os.PathLike, for_transformers: bool = False) -> None:
    """Writes the tokenizer's files into `directory`, so that `load_tokenizer(directory)` reads
    this tokenizer back; with `for_transformers`, also what `transformers.AutoTokenizer` needs to
    read the same ids (the Hugging Face export)."""
    raise NotImplementedError

  def _drop_stale(self, directory: str, written: set[str]) -> None:
    """Removes the tokenizer files of `directory` that this save did not write: a save over another
    model's folder must not leave that tokenizer's tokenizer.json (which `load_tokenizer` prefers)
    or chat template beside this one's files. Not in the tokenizer's own folder."""
    if os.path.abspath(directory) == os.path.abspath(self.folder):
      return
    for name in (files.TOKENIZER_JSON, files.SENTENCEPIECE_MODEL, files.SPECIAL_TOKENS_MAP, files.CHAT_TEMPLATE):
      path = os.path.join(directory, name)
      if name not in written and os.path.isfile(path):
        os.remove(path)

  def decode_continuation(self, prompt_ids, new_ids) -> str:
    """The text `new_ids` add after `prompt_ids`: the prompt's text followed by it is the whole
    text. Decoded alone, a continuation would lose the space before its first word (SentencePiece
    and Llama-style decoders drop the space that a text's first piece starts with)."""
    prompt = self.decode(prompt_ids)
    whole = self.decode(list(prompt_ids) + list(new_ids))
    return whole[len(prompt):] if whole.startswith(prompt) else self.decode(new_ids)

  def _eos_suffix(self, eos: bool) -> list[int]:
    if not eos:
      return []
    if self.eos_id is None:
      raise TokenizerError(f"{self.path}: the tokenizer has no end-of-sequence token (eos_token)")
    return [self.eos_id]

  def _resolve_ids(self, found: files.TokenizerFiles) -> None:
    """eos_ids and pad_id from eos_id and the folder: generation_config.json's (or config.json's)
    eos_token_id joins the tokenizer's EOS; with no pad token, padding uses EOS (masked anyway)."""
    generation_eos = found.generation_eos_ids()
    if self.eos_id is None and generation_eos:
      self.eos_id = generation_eos[0]
    ids = ([self.eos_id] if self.eos_id is not None else []) + list(generation_eos)
    self.eos_ids = tuple(dict.fromkeys(ids))
    if self.pad_id is None:
      pad = found.generation_config.get("pad_token_id", found.model_config.get("pad_token_id"))
      self.pad_id = int(pad) if isinstance(pad, int) and pad >= 0 else self.eos_id
    if self.pad_id is None:
      self.pad_id = 0  # neither pad nor EOS: padded positions are masked out of every loss anyway

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, pad_id={self.pad_id})")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """The tokenizer at `path`: a tokenizer.json, a SentencePiece .model, or a folder holding one."""
  return Tokenizer(path)
