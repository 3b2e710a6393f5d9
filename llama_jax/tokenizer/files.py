"""What a tokenizer folder holds, read as Hugging Face `transformers` (5.x) reads it.

A folder (a Hugging Face checkpoint, our own saved model or training workdir) may hold:
  tokenizer.json           a `tokenizers` serialisation (read by `hf.HFTokenizer`)
  tokenizer.model          a SentencePiece model (read by `spm.SentencePieceTokenizer`)
  tokenizer_config.json    tokenizer_class, the named special tokens (bos_token, eos_token, pad_token,
                           unk_token: a string or an AddedToken dict), added_tokens_decoder, chat_template
                           (a string, or a list of {name, template} of which "default" is used)
  special_tokens_map.json  the named special tokens again; transformers reads it only when
                           tokenizer_config.json has no added_tokens_decoder (then it overrides)
  chat_template.jinja      the chat template; it takes precedence over tokenizer_config's
  generation_config.json   sampling defaults and eos_token_id (an int or a list: every id ends generation)
  config.json              the model's bos/eos/pad_token_id, used when generation_config.json is absent
A tokenizer.json present wins over a tokenizer.model, as it does in transformers (the fast tokenizer).
A path to a file (tokenizer.json or a .model) is read with the JSON files of its own folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"
# The named special tokens transformers knows (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(ValueError):
  """A tokenizer (or its folder) that cannot be read or does not fit; reported as one line."""


@dataclasses.dataclass
class TokenizerFiles:
  """The files of one tokenizer: which backend file, and the folder's JSON metadata."""
  folder: str
  tokenizer_json: str | None  # path, if the folder (or the given path) is a tokenizer.json
  sentencepiece_model: str | None  # path, if a SentencePiece model is given or in the folder
  config: dict  # tokenizer_config.json
  special_tokens_map: dict  # special_tokens_map.json
  generation_config: dict  # generation_config.json
  model_config: dict  # config.json
  chat_template: str | None

  @property
  def tokenizer_class(self) -> str:
    return str(self.config.get("tokenizer_class") or "")

  def named_tokens(self, defaults: dict[str, str] | None = None) -> dict[str, str]:
    """{bos_token: "<s>", ...}: the named special tokens that are set, as transformers resolves
    them (the class's defaults, then tokenizer_config.json, then special_tokens_map.json when the
    config has no added_tokens_decoder)."""
    out = dict(defaults or {})
    sources = [self.config]
    if "added_tokens_decoder" not in self.config:
      sources.append(self.special_tokens_map)
    for source in sources:
      for name in NAMED_TOKENS:
        if name in source:
          out[name] = token_content(source[name])
    return {k: v for k, v in out.items() if v is not None}

  def generation_eos_ids(self) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (or config.json's when it has none): one or several."""
    source = self.generation_config if "eos_token_id" in self.generation_config else self.model_config
    return as_ids(source.get("eos_token_id"))


def token_content(value: Any) -> str | None:
  """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise TokenizerError(f"a special token must be a string or have a 'content' string, got {value!r}")


def as_ids(value: Any) -> tuple[int, ...]:
  if value is None:
    return ()
  values = value if isinstance(value, (list, tuple)) else [value]
  try:
    return tuple(int(v) for v in values)
  except (TypeError, ValueError):
    raise TokenizerError(f"token ids must be integers, got {value!r}") from None


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except json.JSONDecodeError as e:
    raise TokenizerError(f"{path}: not valid JSON ({e})") from None
  except UnicodeDecodeError:
    raise TokenizerError(f"{path}: not UTF-8 text") from None
  if not isinstance(value, dict):
    raise TokenizerError(f"{path}: expected a JSON object")
  return value


def _chat_template(folder: str, config: dict) -> str | None:
  path = os.path.join(folder, CHAT_TEMPLATE)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  template = config.get("chat_template")
  if isinstance(template, list):  # several named templates: transformers' default is "default"
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if template is not None and not isinstance(template, str):
    raise TokenizerError(f"{os.path.join(folder, TOKENIZER_CONFIG)}: chat_template must be a string")
  return template


def has_tokenizer(folder: str) -> bool:
  return any(os.path.isfile(os.path.join(folder, n)) for n in (TOKENIZER_JSON, SENTENCEPIECE_MODEL))


def find(path: str | os.PathLike) -> TokenizerFiles:
  """The tokenizer files at `path`: a folder holding tokenizer.json or tokenizer.model, or one of
  those files (a SentencePiece model may have any name ending in .model)."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    folder = path
    tokenizer_json = os.path.join(folder, TOKENIZER_JSON)
    sp_model = os.path.join(folder, SENTENCEPIECE_MODEL)
    tokenizer_json = tokenizer_json if os.path.isfile(tokenizer_json) else None
    sp_model = sp_model if os.path.isfile(sp_model) else None
    if not tokenizer_json and not sp_model:
      raise TokenizerError(f"{path}: no tokenizer ({TOKENIZER_JSON} or {SENTENCEPIECE_MODEL})")
  elif os.path.isfile(path):
    folder = os.path.dirname(path)
    is_json = path.endswith(".json")
    tokenizer_json, sp_model = (path, None) if is_json else (None, path)
  else:
    raise FileNotFoundError(f"no tokenizer at {path}: no such file or directory")
  config = _read_json(os.path.join(folder, TOKENIZER_CONFIG))
  return TokenizerFiles(
      folder=folder, tokenizer_json=tokenizer_json, sentencepiece_model=sp_model, config=config,
      special_tokens_map=_read_json(os.path.join(folder, SPECIAL_TOKENS_MAP)),
      generation_config=_read_json(os.path.join(folder, GENERATION_CONFIG)),
      model_config=_read_json(os.path.join(folder, MODEL_CONFIG)),
      chat_template=_chat_template(folder, config))


def write_json(path: str, value: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)
    f.write("\n")
  os.replace(tmp, path)


def copy_file(source: str, destination: str) -> None:
  """Copies unless source and destination are the same file (saving a tokenizer where it lies)."""
  import shutil
  if os.path.exists(destination) and os.path.samefile(source, destination):
    return
  shutil.copyfile(source, destination + ".tmp")
  os.replace(destination + ".tmp", destination)
