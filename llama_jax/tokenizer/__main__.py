"""Tokenizer tools.

  python -m llama_jax.tokenizer train --input GLOB [GLOB...] --vocab_size N --output PREFIX
                                      [--character_coverage 0.99995]
  python -m llama_jax.tokenizer extend --base BASE.model --add OTHER.model --output NEW.model
                                       [--checkpoint CKPT --checkpoint_output OUT]

`train` reads any format the data pipeline reads (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet)
and writes PREFIX.model / PREFIX.vocab (LLaMA's settings: BPE, byte fallback, split digits).
--character_coverage is the share of the text's characters that get pieces of their own (the rest
are spelled in bytes); when SentencePiece says the vocabulary is smaller than the required
characters, lower it (down to 0.98; SentencePiece's default is 0.9995) or raise --vocab_size.
`extend` appends the pieces of OTHER that BASE lacks and, with --checkpoint, writes a copy of the
checkpoint whose embedding and output rows are resized to the new vocabulary (new rows: the mean).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Iterator


def _texts(patterns: list[str], text_field: str, fmt: str, counts: dict) -> Iterator[str]:
  from llama_jax.data import records
  for pattern in patterns:
    for path in records.expand(pattern):
      f = records.file_format(path, fmt)
      for record, _, raw in records.records(path, f, text_field):
        try:
          text = records.parse(f, raw, text_field)
        except records.BadRecord as e:
          counts["bad"] += 1
          if counts["bad"] <= records.MAX_WARNINGS:
            print(f"warning: skipped {path}:{record + 1}: {e}", file=sys.stderr)
          continue
        if text:
          counts["docs"] += 1
          yield text


def train(args) -> None:
  from llama_jax.data import records
  from llama_jax.tokenizer import Tokenizer
  from llama_jax.tokenizer import train as sp_train
  for pattern in args.input:  # fail on a glob matching nothing before training starts
    for path in records.expand(pattern):
      records.file_format(path, args.format)
  counts = {"docs": 0, "bad": 0}
  model = sp_train.train(_texts(args.input, args.text_field, args.format, counts), args.vocab_size,
                         args.output, max_chars=args.max_chars, num_threads=args.num_threads,
                         character_coverage=args.character_coverage)
  tok = Tokenizer(model)
  print(f"wrote {model} (vocabulary {tok.vocab_size}) from {counts['docs']} documents"
        + (f"; skipped {counts['bad']} bad records" if counts["bad"] else ""))


def extend(args) -> None:
  from llama_jax.tokenizer import extend as ext
  if bool(args.checkpoint) != bool(args.checkpoint_output):
    raise ValueError("--checkpoint and --checkpoint_output go together")
  if args.checkpoint:  # before anything is written
    from llama_jax.convert.output import check_output
    check_output(args.checkpoint_output, "orbax", args.overwrite, flag="--checkpoint_output")
    check_checkpoint(args.checkpoint, args.base)
  n_base, n_new = ext.merge(args.base, args.add, args.output)
  print(f"wrote {args.output}: {n_base} base pieces + {n_new - n_base} new = {n_new}")
  if args.checkpoint:
    v = resize_checkpoint(args.checkpoint, args.output, args.checkpoint_output, overwrite=True)
    print(f"wrote {args.checkpoint_output}: embedding and output rows resized to {v} (new rows: the mean)")


def check_checkpoint(checkpoint: str, base: str) -> None:
  """The checkpoint can take the new pieces: it opens, its rows are the base tokenizer's, and its
  weights are float (new rows are the mean of the old; a quantized table has no rows to average,
  and its quantization.json would not describe the grown one)."""
  from llama_jax.convert import source
  from llama_jax.tokenizer import Tokenizer
  if not os.path.exists(checkpoint):
    raise ValueError(f"--checkpoint {checkpoint}: no such file or directory")
  src = source.open_source(checkpoint)
  if src.quantization:
    raise ValueError(f"--checkpoint {checkpoint}: holds quantized weights; extend the float checkpoint it "
                     "was quantized from, then quantize the result")
  base_vocab = Tokenizer(base).vocab_size
  if src.config.vocab_size != base_vocab:
    raise ValueError(f"--checkpoint {checkpoint}: vocab_size {src.config.vocab_size} is not the base "
                     f"tokenizer's {base_vocab} pieces; the new pieces' ids would not line up with its rows")


def resize_checkpoint(checkpoint: str, tokenizer_path: str, output: str, overwrite: bool = False) -> int:
  """Loads a checkpoint (any format `llama_jax.load` reads), grows its vocabulary to the tokenizer's
  and saves it as a llama_jax model with that tokenizer (`overwrite`: as `Model.save`'s); returns
  the new vocab size."""
  import jax
  import numpy as np

  import llama_jax
  from llama_jax.tokenizer import Tokenizer
  from llama_jax.tokenizer.extend import resize_rows
  model = llama_jax.load(checkpoint)  # its rows the base tokenizer's (`check_checkpoint`)
  tokenizer = Tokenizer(tokenizer_path)
  params = resize_rows(jax.tree.map(np.asarray, model.params), tokenizer.vocab_size)
  config = model.config.replace(vocab_size=tokenizer.vocab_size)
  llama_jax.Model(config, params, tokenizer).save(output, overwrite=overwrite)
  return tokenizer.vocab_size


def main(argv=None) -> int:
  from llama_jax.tokenizer import train as sp_train
  p = argparse.ArgumentParser(prog="python -m llama_jax.tokenizer", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train a LLaMA-style sentencepiece BPE tokenizer")
  t.add_argument("--input", nargs="+", required=True, help="files or globs (.txt .jsonl[.gz|.zst] .parquet)")
  t.add_argument("--vocab_size", type=int, required=True)
  t.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
  t.add_argument("--text_field", default="text", help="JSON key / parquet column of the text")
  t.add_argument("--format", default="", help="input format if not by extension")
  t.add_argument("--max_chars", type=int, default=200_000_000, help="characters of text to train on")
  t.add_argument("--num_threads", type=int, default=0, help="0: all cores")
  t.add_argument("--character_coverage", type=float, default=sp_train.CHARACTER_COVERAGE,
                 help="share of the text's characters given pieces of their own, in "
                      f"[{sp_train.MIN_CHARACTER_COVERAGE}, 1] (default {sp_train.CHARACTER_COVERAGE}, "
                      "LLaMA's; SentencePiece's is 0.9995); the rarest rest are spelled in byte "
                      "pieces. Lower it when SentencePiece finds the vocabulary smaller than the "
                      "required characters")
  e = sub.add_parser("extend", help="add the pieces of a second model to a base model")
  e.add_argument("--base", required=True)
  e.add_argument("--add", required=True)
  e.add_argument("--output", required=True)
  e.add_argument("--checkpoint", default="", help="a checkpoint to resize to the new vocabulary")
  e.add_argument("--checkpoint_output", default="", help="where the resized checkpoint is saved")
  e.add_argument("--overwrite", action="store_true",
                 help="save into --checkpoint_output even if it holds other files than a llama_jax model's")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  try:
    {"train": train, "extend": extend}[args.command](args)
  except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:  # DataError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
