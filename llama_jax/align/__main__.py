"""python -m llama_jax.align check|export

  check  --model PATH [--model PATH ...] [--template NAME] [--show N]
         the letters demo's measure: the share of greedy answers in the requested letter case
  export --input RM --output DIR [--dtype float32|bfloat16|float16]
         a reward model as transformers' LlamaForSequenceClassification (config.json, safetensors)
"""

from __future__ import annotations

import argparse
import sys

from llama_jax.config import DTYPES


def _check(args) -> None:
  import llama_jax
  from llama_jax.align.demo import preferred_share
  for path in args.model:
    share, rows = preferred_share(llama_jax.load(path), args.template)
    print(f"{path}: {share:.1%} of {len(rows)} requests answered in the requested form")
    for prompt, answer, ok in rows[:args.show]:
      print(f"  {'ok ' if ok else 'no '} {prompt!r} -> {answer!r}")


def _export(args) -> None:
  from llama_jax.align import load_reward_model
  from llama_jax.convert.output import check_output
  check_output(args.output, "hf", args.overwrite)  # before the model is read
  load_reward_model(args.input).export_hf(args.output, dtype=args.dtype, overwrite=True)
  print(f"wrote {args.output} (LlamaForSequenceClassification)")


def main(argv: list[str]) -> int:
  from llama_jax.errors import run_cli
  p = argparse.ArgumentParser(prog="python -m llama_jax.align")
  sub = p.add_subparsers(dest="command", required=True)
  check = sub.add_parser("check", help="the letters demo: share of answers in the requested form")
  check.add_argument("--model", action="append", required=True, help="a model (repeat to compare)")
  check.add_argument("--template", default="vicuna_v1.1", help="chat template the demo trains with")
  check.add_argument("--show", type=int, default=0, help="print the first N prompts and answers")
  export = sub.add_parser("export", help="a reward model to Hugging Face")
  export.add_argument("--input", required=True, help="a reward run's workdir or a saved reward model")
  export.add_argument("--output", required=True)
  export.add_argument("--dtype", choices=DTYPES, default=None)
  export.add_argument("--overwrite", action="store_true",
                      help="write into --output even if it holds other files than a Hugging Face model's")
  args = p.parse_args(argv)
  run_cli(lambda: (_check if args.command == "check" else _export)(args))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
