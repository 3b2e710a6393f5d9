"""Training a LLaMA-style sentencepiece tokenizer: BPE with byte fallback (no unknown bytes),
digits split into single pieces, unk 0 / BOS 1 / EOS 2 and no pad piece, identity normalisation
and whitespace kept as is (code indentation survives), as the LLaMA tokenizer's trainer_spec reads.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import sentencepiece as spm

MAX_SENTENCE_CHARS = 8192  # longer lines are cut; sentencepiece would otherwise drop them
# The share of the training text's characters that get pieces of their own (LLaMA's; SentencePiece's
# default is 0.9995); the rarest rest are spelled in byte pieces. A vocabulary too small for the
# characters this covers is SentencePiece's error "Vocabulary size is smaller than required_chars".
CHARACTER_COVERAGE = 0.99995
MIN_CHARACTER_COVERAGE = 0.98  # SentencePiece's trainer refuses less (trainer_interface.cc, VerifySpec)


def llama_trainer_spec(vocab_size: int, character_coverage: float = CHARACTER_COVERAGE) -> dict:
  return dict(
      model_type="bpe", vocab_size=int(vocab_size), byte_fallback=True, split_digits=True,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
      add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
      character_coverage=float(character_coverage), max_sentence_length=4 * MAX_SENTENCE_CHARS,
      split_by_whitespace=True)


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
          num_threads: int = 0, character_coverage: float = CHARACTER_COVERAGE) -> str:
  """Trains on the lines of `texts`; writes PREFIX.model and PREFIX.vocab; returns the .model path.
  `character_coverage`: see CHARACTER_COVERAGE."""
  if not MIN_CHARACTER_COVERAGE <= character_coverage <= 1:
    raise ValueError(f"character_coverage must lie in [{MIN_CHARACTER_COVERAGE}, 1] (SentencePiece's "
                     f"bounds), got {character_coverage}")
  directory = os.path.dirname(os.path.abspath(output_prefix))
  os.makedirs(directory, exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines(texts, max_chars), model_prefix=output_prefix,
      num_threads=num_threads or (os.cpu_count() or 1), minloglevel=2,
      **llama_trainer_spec(vocab_size, character_coverage))
  return output_prefix + ".model"
