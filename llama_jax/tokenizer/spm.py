"""The SentencePiece backend: a `tokenizer.model` (LLaMA 1/2's tokenizer, and the ones this project
trains and extends), read with Google's `sentencepiece` library.

BOS/EOS/unk are the model's own pieces (LLaMA: 1, 2, 0); with no pad piece (LLaMA's pad_id is -1)
padding uses EOS. `encode(text, bos=True)` prepends BOS unless the folder's tokenizer_config.json
says add_bos_token=false, as transformers' LlamaTokenizer does; `encode` never reads special-token
strings in the text ("</s>" is four characters to sentencepiece), `encode_with_offsets` does (the
control pieces' strings become their ids, as transformers' slow tokenizer splits them out), which
is what chat templates that write `bos_token` / `eos_token` into their text need.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Sequence

import sentencepiece

from llama_jax.tokenizer import files
from llama_jax.tokenizer.base import Tokenizer
from llama_jax.tokenizer.files import TokenizerError

log = logging.getLogger("llama_jax")

class SentencePieceTokenizer(Tokenizer):

  def __init__(self, path: str | os.PathLike):
    found = files.find(path)
    model = found.sentencepiece_model
    if model is None:
      raise TokenizerError(f"{path}: no SentencePiece model")
    try:
      self.sp = sentencepiece.SentencePieceProcessor(model_file=model)
    except (RuntimeError, OSError) as e:
      reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
      raise TokenizerError(f"{model}: not a SentencePiece model ({reason})") from None
    self.path = model
    self.folder = found.folder
    self.vocab_size: int = self.sp.vocab_size()
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
    self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
    self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
    self.add_bos = bool(found.config.get("add_bos_token", True)) and self.bos_id is not None
    # transformers' LlamaTokenizer appends EOS with the special tokens when the config says so; here
    # only eos=True does (the protocol's rule, `base`), but saves and exports keep the setting.
    self._adds_eos = bool(found.config.get("add_eos_token", False)) and self.eos_id is not None
    self.chat_template = found.chat_template
    self.generation_config = found.generation_config
    self._config = found.config
    self._resolve_ids(found)
    names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.sp.unk_id(),
             "pad_token": self.sp.pad_id()}
    self.special_tokens_map = {k: self.sp.id_to_piece(i) for k, i in names.items()
                               if i is not None and 0 <= i < self.vocab_size}
    # Control and unknown pieces ("<s>", "</s>", "<unk>") as a chat template writes them.
    self.special_tokens = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                           if self.sp.is_control(i) or self.sp.is_unknown(i)}
    self._special_re = re.compile("(" + "|".join(
        re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)) + ")")

  @classmethod
  def reads(cls, found: files.TokenizerFiles) -> bool:
    from llama_jax.tokenizer.meta_llama3 import is_tiktoken_file  # (Llama 3's tokenizer.model is not ours)
    return (found.tokenizer_json is None and found.sentencepiece_model is not None
            and not is_tiktoken_file(found.sentencepiece_model))

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    prefix = [self.bos_id] if bos and self.add_bos else []
    return prefix + self.sp.encode(text) + self._eos_suffix(eos)

  def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                   num_threads: int = 0) -> list[list[int]]:
    """sentencepiece's own batch encoding, on `num_threads` threads (0: every core)."""
    prefix = [self.bos_id] if bos and self.add_bos else []
    suffix = self._eos_suffix(eos)
    batch = self.sp.encode(list(texts), num_threads=num_threads or (os.cpu_count() or 1))
    return [prefix + ids + suffix for ids in batch] if prefix or suffix else batch

  def encode_with_offsets(self, text: str) -> list[tuple[int, int, int]]:
    out, offset = [], 0
    for part in self._special_re.split(text) if self.special_tokens else [text]:
      if part in self.special_tokens:
        out.append((self.special_tokens[part], offset, offset + len(part)))
      elif part:
        # sentencepiece's offsets are bytes of the text; ours are characters.
        char_at = [i for i, ch in enumerate(part) for _ in range(len(ch.encode("utf-8")))] + [len(part)]
        out += [(p.id, offset + char_at[p.begin], offset + char_at[p.end]) for p in _proto(self.sp, part).pieces]
      offset += len(part)
    return out

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])

  def token_to_id(self, token: str) -> int | None:
    i = self.sp.piece_to_id(token)
    return i if self.sp.id_to_piece(i) == token else None

  def id_to_piece(self, i: int) -> str:
    return self.sp.id_to_piece(int(i))

  def save(self, directory: str | os.PathLike, for_transformers: bool = False) -> None:
    """tokenizer.model and tokenizer_config.json (its special tokens, add_bos_token, the chat
    template), generation_config.json if the tokenizer came with one. For transformers, also a
    tokenizer.json converted from the model (`spm_json`): transformers 5's own conversion of a
    tokenizer.model (LlamaTokenizer) drops the dummy-prefix "▁" of a text that starts with a space,
    so its ids would differ from sentencepiece's; the converted file gives sentencepiece's ids. A
    model `spm_json` cannot express (a normalisation other than identity) is left to transformers'
    conversion, with a warning."""
    from llama_jax.tokenizer import spm_json
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    files.copy_file(self.path, os.path.join(directory, files.SENTENCEPIECE_MODEL))
    config = {k: v for k, v in self._config.items() if k not in ("added_tokens_decoder", "auto_map")}
    config.update(self.special_tokens_map)
    config.update(tokenizer_class="LlamaTokenizer", add_bos_token=self.add_bos, add_eos_token=self._adds_eos,
                  legacy=True, clean_up_tokenization_spaces=False)
    config.setdefault("pad_token", None)
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    written = {files.SENTENCEPIECE_MODEL}
    if for_transformers:
      try:
        spm_json.write(self, os.path.join(directory, files.TOKENIZER_JSON))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # read the file as written
        written.add(files.TOKENIZER_JSON)
      except TokenizerError as e:  # transformers converts the model itself, less exactly
        log.warning("%s; transformers will convert tokenizer.model itself", e)
    self._drop_stale(directory, written)
    files.write_json(os.path.join(directory, files.TOKENIZER_CONFIG), config)
    if self.generation_config:
      files.write_json(os.path.join(directory, files.GENERATION_CONFIG), self.generation_config)


def _proto(sp: sentencepiece.SentencePieceProcessor, text: str):
  try:
    return sp.encode(text, out_type="proto")  # sentencepiece >= 0.2
  except (ValueError, TypeError):
    return sp.encode(text, out_type="immutable_proto")  # sentencepiece 0.1.99
