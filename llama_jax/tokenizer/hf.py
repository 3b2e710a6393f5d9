"""The Hugging Face `tokenizers` backend: a tokenizer.json (Llama 3, SmolLM, TinyLlama, Mistral and
most models since 2024), read so that its ids equal `transformers.AutoTokenizer`'s (5.x) on the
same folder, and batch-encoded by the Rust library on all cores.

How transformers 5 reads a LLaMA-family folder (`models/auto/tokenization_auto.py`,
`tokenization_utils_tokenizers.py`), and so how it is read here:
- tokenizer_class PreTrainedTokenizerFast / TokenizersBackend (Llama 3), none, or a class with no
  rebuild below: the file as it is.
- LlamaTokenizer(Fast) (Llama 2, Mistral, TinyLlama, Vicuna) with a file that is not byte-level
  (transformers' test: the text '"ByteLevel"' in it): transformers' `LlamaTokenizer` keeps the
  vocabulary, merges, added tokens and post-processor and rebuilds the rest: no normalizer, a
  Metaspace pre-tokenizer with prepend_scheme "first" ("always" with legacy=true, "never" with
  add_prefix_space=false), BPE with byte fallback and no unk token. So no "▁" is added after a
  special token, nor before a text that already starts with a space: ids that differ from the
  file's own pipeline (and from sentencepiece) there. A byte-level file is read as it is.
- GPT2Tokenizer(Fast) (SmolLM): a ByteLevel pre-tokenizer with GPT-2's regex (add_prefix_space from
  the config, default false), no normalizer, the ByteLevel decoder.
- The named special tokens (`files.TokenizerFiles.named_tokens`, with the class's defaults:
  LlamaTokenizer <s> </s> <unk>, GPT2Tokenizer <|endoftext|>) and the config's
  added_tokens_decoder are added as special tokens where the file lacks them.
- BOS before a sequence: the file's post-processor decides (`encode(text, bos=True)` is
  transformers' `add_special_tokens=True`: BOS for Llama 2/3, nothing for GPT-2/ChatML-style
  tokenizers), but for EOS, which only `eos=True` adds (a post-processor that appends one has it
  dropped otherwise: the protocol's rule, `base`). transformers 5 does not apply tokenizer_config's
  add_bos_token / add_eos_token to a tokenizer.json (measured on 5.24), so neither does this.
- Truncation and padding stored in the file are turned off, as transformers turns them off per call.
Special-token strings in a text become their ids (transformers' default); `decode` drops special
tokens (transformers' `skip_special_tokens=True`).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import tokenizers
from tokenizers import AddedToken

from llama_jax.tokenizer import files
from llama_jax.tokenizer.base import Tokenizer
from llama_jax.tokenizer.files import TokenizerError


def _llama(spec: dict, config: dict, text: str) -> dict:
  if '"ByteLevel"' in text or (spec.get("model") or {}).get("type") != "BPE":
    return spec
  add_prefix_space = config.get("add_prefix_space")
  add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
  scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
  spec["normalizer"] = None
  spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": False}
  steps = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
           {"type": "Fuse"}]
  if add_prefix_space:
    steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
  spec["decoder"] = {"type": "Sequence", "decoders": steps}
  spec["model"].update(dropout=None, unk_token=None, continuing_subword_prefix=None, end_of_word_suffix=None,
                       fuse_unk=True, byte_fallback=True, ignore_merges=False)
  return spec


def _gpt2(spec: dict, config: dict, text: str) -> dict:
  if (spec.get("model") or {}).get("type") != "BPE":
    return spec
  spec["normalizer"] = None
  spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": bool(config.get("add_prefix_space", False)),
                           "trim_offsets": True, "use_regex": True}
  spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
  spec["model"].update(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                       fuse_unk=False, byte_fallback=False, ignore_merges=False)
  return spec


# tokenizer_class (without "Fast") -> (rebuild of the file's pipeline, default named tokens).
TRANSFORMERS_CLASSES = {
    "LlamaTokenizer": (_llama, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "GPT2Tokenizer": (_gpt2, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                              "unk_token": "<|endoftext|>"}),
}


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


class HFTokenizer(Tokenizer):

  def __init__(self, path: str | os.PathLike):
    found = files.find(path)
    if found.tokenizer_json is None:
      raise TokenizerError(f"{path}: no {files.TOKENIZER_JSON}")
    self.path, self.folder = found.tokenizer_json, found.folder
    try:
      with open(self.path, encoding="utf-8") as f:
        text = f.read()
      spec = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise TokenizerError(f"{self.path}: not a tokenizer.json (not valid JSON: {_first_line(e)})") from None
    if not isinstance(spec, dict):
      raise TokenizerError(f"{self.path}: not a tokenizer.json (expected a JSON object)")
    rebuild, defaults = TRANSFORMERS_CLASSES.get(found.tokenizer_class.removesuffix("Fast"), (None, {}))
    if rebuild is not None:
      spec = rebuild(spec, found.config, text)
    try:
      tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the Rust library's errors are plain Exceptions
      raise TokenizerError(f"{self.path}: not a tokenizer.json the tokenizers library reads ({_first_line(e)})") from None
    self._setup(tok, found, defaults)

  def _setup(self, tok: tokenizers.Tokenizer, found: files.TokenizerFiles, defaults: dict[str, str]) -> None:
    """Everything but the pipeline itself: special tokens, ids, template, what encode adds."""
    self._tok = tok
    self._tok.no_truncation()
    self._tok.no_padding()
    self.special_tokens_map = found.named_tokens(defaults)
    self._add_tokens(found)
    self.bos_id = self._named_id("bos_token")
    self.eos_id = self._named_id("eos_token")
    self.pad_id = self._named_id("pad_token")
    self.chat_template = found.chat_template
    self.generation_config = found.generation_config
    self._config = found.config
    self._resolve_ids(found)
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    with_special = self._tok.encode("a", add_special_tokens=True).ids
    plain = self._tok.encode("a", add_special_tokens=False).ids
    self.add_bos = self.bos_id is not None and with_special[:1] == [self.bos_id] != plain[:1]
    # (any id that ends generation: a post-processor may append another than eos_token's)
    self._adds_eos = bool(with_special) and with_special[-1] in self.eos_ids and with_special[-1:] != plain[-1:]

  @classmethod
  def reads(cls, found: files.TokenizerFiles) -> bool:
    return found.tokenizer_json is not None

  def _add_tokens(self, found: files.TokenizerFiles) -> None:
    """The config's added_tokens_decoder, then the named special tokens, where the file lacks them."""
    present = {t.content for t in self._tok.get_added_tokens_decoder().values()}
    decoder = found.config.get("added_tokens_decoder") or {}
    extra = []
    for _, token in sorted(decoder.items(), key=lambda kv: int(kv[0])):
      if isinstance(token, dict) and token.get("content") not in present:
        extra.append(AddedToken(token["content"], single_word=bool(token.get("single_word")),
                                lstrip=bool(token.get("lstrip")), rstrip=bool(token.get("rstrip")),
                                normalized=bool(token.get("normalized", False)), special=bool(token.get("special", True))))
        present.add(token["content"])
    for content in self.special_tokens_map.values():
      if content not in present:
        extra.append(AddedToken(content, normalized=False, special=True))
        present.add(content)
    for token in extra:  # one at a time, in the config's order of ids: each gets the next id
      (self._tok.add_special_tokens if token.special else self._tok.add_tokens)([token])

  def _named_id(self, name: str) -> int | None:
    token = self.special_tokens_map.get(name)
    return None if token is None else self._tok.token_to_id(token)

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    return self._ends(self._tok.encode(text, add_special_tokens=bos).ids, bos, eos)

  def _ends(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
    """EOS as asked: a post-processor's own EOS (`_adds_eos`) goes unless `eos` (the protocol's rule)."""
    if bos and self._adds_eos:
      ids = ids[:-1]
    return ids + self._eos_suffix(eos)

  def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                   num_threads: int = 0) -> list[list[int]]:
    """The Rust library's batch encoding, without offsets, on its own thread pool (every core, or
    RAYON_NUM_THREADS): `num_threads` chooses only between 1 (one text at a time) and the pool."""
    if num_threads == 1:
      batch = [self._tok.encode_batch_fast([t], add_special_tokens=bos)[0].ids for t in texts]
    else:
      batch = [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=bos)]
    return [self._ends(ids, bos, eos) for ids in batch] if eos or (bos and self._adds_eos) else batch

  def encode_with_offsets(self, text: str) -> list[tuple[int, int, int]]:
    encoding = self._tok.encode(text, add_special_tokens=False)
    return [(i, b, e) for i, (b, e) in zip(encoding.ids, encoding.offsets)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def save(self, directory: str | os.PathLike, for_transformers: bool = False) -> None:
    """The folder's own files, copied as they are (so transformers reads them as it read the
    source): tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja,
    generation_config.json, tokenizer.model. A config that names no tokenizer_class gets
    PreTrainedTokenizerFast (the file as it is, as it was read here): transformers would otherwise
    pick the class from the model type and rebuild the pipeline."""
    del for_transformers  # the files are transformers' already
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    files.copy_file(self.path, os.path.join(directory, files.TOKENIZER_JSON))
    written = {files.TOKENIZER_JSON}
    for name in (files.SPECIAL_TOKENS_MAP, files.CHAT_TEMPLATE, files.GENERATION_CONFIG, files.SENTENCEPIECE_MODEL):
      source = os.path.join(self.folder, name)
      if os.path.isfile(source):
        files.copy_file(source, os.path.join(directory, name))
        written.add(name)
    self._drop_stale(directory, written)
    config = dict(self._config)
    if not config.get("tokenizer_class"):
      config["tokenizer_class"] = "PreTrainedTokenizerFast"
      config.update({k: v for k, v in self.special_tokens_map.items() if k not in config})
    if config != self._config or not os.path.isfile(os.path.join(self.folder, files.TOKENIZER_CONFIG)):
      files.write_json(os.path.join(directory, files.TOKENIZER_CONFIG), config)
    else:
      files.copy_file(os.path.join(self.folder, files.TOKENIZER_CONFIG), os.path.join(directory, files.TOKENIZER_CONFIG))
