"""Tokenizers and chat templates.

  base       the `Tokenizer` protocol (encode, encode_batch, decode, bos_id, eos_ids, pad_id,
             chat_template, save, ...); `Tokenizer(path)` / `load_tokenizer(path)` pick the backend
  spm        the SentencePiece backend (tokenizer.model: LLaMA 1/2, and what `train` trains)
  hf         the Hugging Face `tokenizers` backend (tokenizer.json), read as transformers 5 reads it
  files      what a tokenizer folder holds (tokenizer_config.json, special_tokens_map.json,
             chat_template.jinja, generation_config.json, config.json), read as transformers does
  spm_json   a SentencePiece model written as a tokenizer.json with the same ids (the HF export)
  byte_level the byte-level BPE alphabet (GPT-2's bytes_to_unicode, Llama 3's)
  meta_llama3  Meta's Llama 3 tokenizer.model (tiktoken's BPE ranks), read as the tokenizer.json
             transformers makes of it
  chat       chat templates: the built-ins (vicuna_v1.1, llama-2, chatml, raw) and the model's own
             Jinja template rendered as transformers' apply_chat_template; which text is answer
  train      training a LLaMA-style SentencePiece model; `extend` merges vocabularies
  __main__   `python -m llama_jax.tokenizer train|extend`

`Tokenizer` is the protocol's base class; constructing it with a path returns the backend that
reads the path (as `pathlib.Path` returns a `PosixPath`), so `Tokenizer("tokenizer.model")` is a
`SentencePieceTokenizer` and `Tokenizer("DIR")` with a tokenizer.json an `HFTokenizer`.
"""

from llama_jax.tokenizer.base import Tokenizer, load_tokenizer
from llama_jax.tokenizer.files import TokenizerError, has_tokenizer
from llama_jax.tokenizer.hf import HFTokenizer
from llama_jax.tokenizer.meta_llama3 import MetaLlama3Tokenizer
from llama_jax.tokenizer.spm import SentencePieceTokenizer

__all__ = ["HFTokenizer", "MetaLlama3Tokenizer", "SentencePieceTokenizer", "Tokenizer", "TokenizerError",
           "has_tokenizer", "load_tokenizer"]
