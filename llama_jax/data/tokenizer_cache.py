"""The tokenizer of a run: the configured one, or one trained on the training sources on first use
and cached, keyed by the sources (files and sizes), their weights and the vocabulary size."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Iterator

from llama_jax.data import corpus
from llama_jax.data.errors import DataError
from llama_jax.data.pipeline import resolve_sources, selector
from llama_jax.data.sources import SourceStream

TRAINER_VERSION = 1  # bump when the trainer settings change, so cached tokenizers are retrained


def _texts(spec: dict, select, chars: int) -> Iterator[str]:
  """The first `chars` characters of a source's training documents (one pass, no tokenizer)."""
  stream = SourceStream(spec["name"], spec["files"], spec["format"], spec["text_field"], 1, 0, None,
                        select, chunk_chars=1 << 20)
  pos, total = stream.start_position(), 0
  while not pos["done"] and total < chars:
    texts, pos = stream.read_texts(pos)
    for t in texts:
      yield t[:chars - total]
      total += len(t)
      if total >= chars:
        return


def _sample(specs: list[dict], select, chars: int) -> Iterator[str]:
  """Documents of every source, each source's share of `chars` by its weight, interleaved."""
  total = sum(s["weight"] for s in specs)
  its = [_texts(s, select, int(chars * s["weight"] / total)) for s in specs]
  while its:
    for it in list(its):
      try:
        yield next(it)
      except StopIteration:
        its.remove(it)


def ensure_tokenizer(data_cfg, workdir: str | None = None) -> str:
  """The tokenizer's path: `data_cfg.tokenizer` if set (a file or a folder), else a sentencepiece
  model trained on the training sources (BPE, byte fallback, `data_cfg.vocab_size`) and cached
  under `data_cfg.cache_dir`."""
  del workdir  # the caller copies the model into its workdir
  if data_cfg.tokenizer:
    path = os.path.expanduser(data_cfg.tokenizer)
    if not os.path.exists(path):
      raise DataError(f"data.tokenizer: no such file or directory {path}")
    return path
  from llama_jax.tokenizer import train as sp_train
  specs = resolve_sources(data_cfg, "train")
  key = json.dumps({"v": TRAINER_VERSION, "vocab": int(data_cfg.vocab_size),
                    "chars": int(data_cfg.tokenizer_train_chars), "holdout": int(data_cfg.holdout_every),
                    "sources": [[s["name"], s["weight"], s["text_field"],
                                 [[os.path.abspath(f), os.path.getsize(f)] for f in s["files"]]]
                                for s in specs]}, sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  cache_dir = os.path.expanduser(data_cfg.cache_dir or corpus.default_cache_dir())
  directory = os.path.join(cache_dir, "tokenizers", f"bpe{int(data_cfg.vocab_size)}-{digest}")
  model = os.path.join(directory, "tokenizer.model")
  if os.path.isfile(model):
    return model
  tmp = f"{directory}.tmp{os.getpid()}"
  os.makedirs(tmp, exist_ok=True)
  # Held-out records stay out of the tokenizer's training text too.
  select = selector(data_cfg, "train")
  texts = [0]  # documents sampled: none means every source is empty

  def counted():
    for text in _sample(specs, select, int(data_cfg.tokenizer_train_chars)):
      texts[0] += bool(text.strip())
      yield text

  try:
    sp_train.train(counted(), int(data_cfg.vocab_size), os.path.join(tmp, "tokenizer"),
                   max_chars=int(data_cfg.tokenizer_train_chars), num_threads=int(data_cfg.num_threads))
  except RuntimeError as e:  # sentencepiece's errors, e.g. a vocabulary too large for the text
    shutil.rmtree(tmp, ignore_errors=True)
    if not texts[0]:
      names = ", ".join(s["name"] for s in specs)
      raise DataError(f"data.sources hold no text to train a tokenizer on ({names} "
                      f"{'are' if len(specs) > 1 else 'is'} empty)") from None
    raise DataError(f"training the tokenizer on data.sources failed: {e}") from None
  with open(os.path.join(tmp, "sources.json"), "w") as f:
    f.write(key)
  try:
    os.rename(tmp, directory)
  except OSError:  # another process finished first
    shutil.rmtree(tmp, ignore_errors=True)
  return model
