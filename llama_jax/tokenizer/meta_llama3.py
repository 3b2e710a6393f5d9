"""Meta's Llama 3 `tokenizer.model`: not SentencePiece, but tiktoken's BPE ranks (one line a token:
its bytes in base64 and its rank), which Meta's `llama/tokenizer.py` reads with tiktoken.

Read here as the byte-level BPE that transformers' `TikTokenConverter` makes of the same file (the
tokenizer.json of Hugging Face's Llama 3 repositories): every token's bytes as GPT-2's printable
characters, the ranks as ids, as merges every split of a token into two tokens (ordered by the
token's rank), whole tokens taken before merges (`ignore_merges`, as tiktoken looks a piece up
before merging it), Llama 3's pre-tokenizer regex, and the 256 special tokens after the ranks
(Llama 3.1's names: <|begin_of_text|> 128000, <|end_of_text|> 128001, <|eom_id|> 128008,
<|eot_id|> 128009, ...). BOS is prepended; generation ends at <|end_of_text|>, <|eom_id|> and
<|eot_id|> (Llama 3.1's generation_config.json); the chat template is Llama 3's. Files beside it
(tokenizer_config.json, generation_config.json, chat_template.jinja) override those defaults.
`save` writes the converted tokenizer.json, which transformers and `hf.HFTokenizer` read.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from llama_jax.tokenizer import files
from llama_jax.tokenizer.byte_level import BYTE_TO_CHAR
from llama_jax.tokenizer.files import TokenizerError
from llama_jax.tokenizer.hf import HFTokenizer

# Meta's `llama/tokenizer.py` pat_str.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL = 256
_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
          "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
          "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
SPECIAL_TOKENS = _NAMED + [f"<|reserved_special_token_{i}|>" for i in range(3, NUM_SPECIAL - len(_NAMED) + 3)]
CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
          "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": True, "model_max_length": 131072}
CHAT_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+$")


def is_tiktoken_file(path: str) -> bool:
  """Whether `path` holds tiktoken ranks (a SentencePiece model is a binary protobuf)."""
  try:
    with open(path, "rb") as f:
      first = f.readline(4096)
      while first and not first.strip():  # (blank lines before the first rank)
        first = f.readline(4096)
  except OSError:
    return False
  return bool(_LINE.match(first.removeprefix(b"\xef\xbb\xbf").strip()))


def read_ranks(path: str) -> dict[bytes, int]:
  ranks = {}
  with open(path, "rb") as f:
    for number, line in enumerate(f, start=1):
      line = line.removeprefix(b"\xef\xbb\xbf") if number == 1 else line
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
      except (ValueError, binascii.Error):
        raise TokenizerError(f"{path}:{number}: not a tiktoken rank line (base64 token, space, rank)") from None
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise TokenizerError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once")
  if any(bytes([b]) not in ranks for b in range(256)):
    raise TokenizerError(f"{path}: not every single byte has a rank (a byte-level BPE needs all 256)")
  return ranks


def convert(path: str) -> tokenizers.Tokenizer:
  """The tokenizers pipeline for the ranks at `path` (see the module's docstring)."""
  ranks = read_ranks(path)
  text = {token: "".join(BYTE_TO_CHAR[b] for b in token) for token in ranks}
  merges = []
  for token, rank in ranks.items():
    splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
    splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
    merges += [(rank, text[left], text[right]) for left, right in splits]
  merges.sort(key=lambda merge: merge[0])  # (stable: a token's own splits keep their order)
  tok = tokenizers.Tokenizer(models.BPE(vocab={text[t]: r for t, r in ranks.items()},
                                        merges=[(left, right) for _, left, right in merges], ignore_merges=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(SPLIT), "isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
  bos = SPECIAL_TOKENS[0]
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                    special_tokens=[(bos, len(ranks))])])
  return tok


class MetaLlama3Tokenizer(HFTokenizer):
  """Meta's Llama 3 tokenizer.model, read as the tokenizer.json transformers would make of it."""

  def __init__(self, path: str | os.PathLike):
    found = files.find(path)
    self.path, self.folder = found.sentencepiece_model, found.folder
    tok = convert(self.path)
    first = tok.token_to_id(SPECIAL_TOKENS[0])
    eos = [tok.token_to_id(name) for name in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    found.config = {**CONFIG, **found.config}
    found.generation_config = found.generation_config or {"bos_token_id": first, "eos_token_id": eos}
    found.chat_template = found.chat_template or CHAT_TEMPLATE
    self._setup(tok, found, {})

  @classmethod
  def reads(cls, found: files.TokenizerFiles) -> bool:
    return (found.tokenizer_json is None and found.sentencepiece_model is not None
            and is_tiktoken_file(found.sentencepiece_model))

  def save(self, directory: str | os.PathLike, for_transformers: bool = False) -> None:
    """tokenizer.json (the converted pipeline), tokenizer_config.json with the chat template,
    generation_config.json: a folder `hf.HFTokenizer` and transformers read with the same ids."""
    del for_transformers  # the files are transformers' already
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    self._tok.save(os.path.join(directory, files.TOKENIZER_JSON))
    self._drop_stale(directory, {files.TOKENIZER_JSON})
    files.write_json(os.path.join(directory, files.TOKENIZER_CONFIG),
                     {**self._config, "chat_template": self.chat_template})
    files.write_json(os.path.join(directory, files.GENERATION_CONFIG), self.generation_config)
