"""Training a LLaMA-style sentencepiece tokenizer: BPE with byte fallback (no unknown bytes),
digits split into single pieces, unk 0 / BOS 1 / EOS 2 and no pad piece, identity normalisation
and whitespace kept as is (code indentation survives), as the LLaMA tokenizer's trainer_spec reads.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import sentencepiece as spm

MAX_SENTENCE_CHARS = 8192  # longer lines are cut; sentencepiece would otherwise drop them


def llama_trainer_spec(vocab_size: int) -> dict:
  return dict(
      model_type="bpe", vocab_size=int(vocab_size), byte_fallback=True, split_digits=True,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
      add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
      character_coverage=0.99995, max_sentence_length=4 * MAX_SENTENCE_CHARS, split_by_whitespace=True)


def lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Training sentences: the non-empty lines of the documents, up to `max_chars` characters."""
  total = 0
  for text in texts:
    for line in text.split("\n"):
      if line.strip():
        line = line[:MAX_SENTENCE_CHARS]
        yield line
        total += len(line)
        if total >= max_chars:
          return


def train(texts: Iterable[str], vocab_size: int, output_prefix: str, max_chars: int = 50_000_000,
          num_threads: int = 0) -> str:
  """Trains on the lines of `texts`; writes PREFIX.model and PREFIX.vocab; returns the .model path."""
  directory = os.path.dirname(os.path.abspath(output_prefix))
  os.makedirs(directory, exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines(texts, max_chars), model_prefix=output_prefix,
      num_threads=num_threads or (os.cpu_count() or 1), minloglevel=2, **llama_trainer_spec(vocab_size))
  return output_prefix + ".model"
