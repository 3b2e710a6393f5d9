"""Command line: perplexity or multiple-choice accuracy of one or more models.

  python -m llama_jax.evaluate perplexity --model PATH [--model PATH2 ...] --data FILE
      [--seq_len N --stride S --batch_size B]
  python -m llama_jax.evaluate choice --model PATH [--model PATH2 ...] --data FILE.jsonl
      [--shots K --seed S --batch_size B]

Prints a table with one row per model, then (last line) JSON: the metrics of a single model, or a
list of {"model": PATH, ...metrics} for several.

`lm_eval_command` is `llama-jax-lm-eval`: lm-eval-harness's command line with our model registered.
lm-eval is an optional dependency (the `lm_eval` extra): it pulls in PyTorch and the Hugging Face
stack, which a JAX install does not otherwise need; without it the command says what to install.
"""

from __future__ import annotations

import argparse
import json
import sys

from llama_jax.config import DTYPES
from llama_jax.evaluate.data import EvalDataError, read_choices, read_text
from llama_jax.evaluate.table import format_table

COLUMNS = {"perplexity": ("perplexity", "nll", "tokens"), "choice": ("acc", "acc_norm", "examples")}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m llama_jax.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  for name in COLUMNS:
    p = commands.add_parser(name)
    p.add_argument("--model", action="append", required=True,
                   help="a checkpoint llama_jax.load reads; repeat to compare models")
    p.add_argument("--data", required=True)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer.json, a SentencePiece .model or a folder holding one (default: the checkpoint's)")
    p.add_argument("--no_progress", action="store_true")
  commands.choices["perplexity"].add_argument("--seq_len", type=int, default=None,
                                              help="window length in tokens, at most the model's max_seq_len "
                                                   "(default: max_seq_len)")
  commands.choices["perplexity"].add_argument("--stride", type=int, default=None,
                                              help="tokens between window starts (default: seq_len)")
  commands.choices["choice"].add_argument("--shots", type=int, default=0)
  commands.choices["choice"].add_argument("--seed", type=int, default=0)
  return parser


def _evaluate(args, path: str) -> dict:
  import llama_jax
  from llama_jax.evaluate.choice import choice_file
  from llama_jax.evaluate.perplexity import perplexity_file

  try:
    model = llama_jax.load(path, dtype=args.dtype, tokenizer=args.tokenizer)
  except ValueError as e:  # a config this project cannot read
    # Name the model (several may be compared), once: most load errors begin with its path already.
    message = str(e)
    raise ValueError(message if message.startswith(path) else f"{path}: {message}") from None
  if model.tokenizer is None:
    raise EvalDataError(path, "the checkpoint has no tokenizer (tokenizer.json or tokenizer.model); pass --tokenizer")
  progress = not args.no_progress
  if args.command == "perplexity":
    context = model.config.max_seq_len
    seq_len = context if args.seq_len is None else args.seq_len
    if seq_len > context:  # positions the model never trained on: generate and serve refuse them too
      raise ValueError(f"{path}: --seq_len {seq_len} is longer than the model's context of {context} tokens "
                       "(its max_seq_len)")
    stride = seq_len if args.stride is None else args.stride
    if stride > seq_len:
      raise ValueError(f"--stride {stride} is longer than the window of {seq_len} tokens (--seq_len)")
    return perplexity_file(model, args.data, seq_len, stride, args.batch_size, progress)
  return choice_file(model, args.data, args.shots, args.seed, args.batch_size, progress)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.batch_size < 1:
    print(f"error: --batch_size must be positive, got {args.batch_size}", file=sys.stderr)
    return 2
  if args.command == "perplexity":
    # `is not None`: 0 is a bad value, not "the default".
    if args.seq_len is not None and args.seq_len < 2:
      print(f"error: --seq_len must be at least 2 (a token and its context), got {args.seq_len}", file=sys.stderr)
      return 2
    if args.stride is not None and args.stride < 1:
      print(f"error: --stride must be positive, got {args.stride}", file=sys.stderr)
      return 2
  rows = []
  try:
    # Check the data before loading any model: a bad line should not cost a model load.
    if args.command == "perplexity":
      read_text(args.data)
    elif not 0 <= args.shots < len(read_choices(args.data)):
      raise EvalDataError(args.data, f"--shots {args.shots} needs 0 <= shots < the number of examples")
    for path in args.model:
      rows.append({"model": path, **_evaluate(args, path)})
  # Bad data, a missing checkpoint or tokenizer; ValueError: an example the model cannot score
  # (its continuation longer than the context), a damaged checkpoint (CheckpointError).
  except (EvalDataError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  columns = COLUMNS[args.command]
  print(format_table(rows, ("model",) + columns))
  if len(rows) == 1:
    print(json.dumps({c: rows[0][c] for c in columns}))
  else:
    print(json.dumps(rows))
  return 0


def lm_eval_command() -> None:
  try:
    import lm_eval  # noqa: F401
  except ImportError:
    print("error: llama-jax-lm-eval needs lm-eval, an optional dependency: pip install 'llama_jax[lm_eval]'",
          file=sys.stderr)
    sys.exit(1)
  from llama_jax.evaluate import lm_eval_harness
  lm_eval_harness.main()


if __name__ == "__main__":
  sys.exit(main())
