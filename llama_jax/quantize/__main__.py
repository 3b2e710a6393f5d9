"""Command line: quantize a model's weights to int8 or int4.

  python -m llama_jax.quantize --model SRC --output DST --bits 8|4 [--method rtn|gptq]
      [--group_size 128] [--scheme sym|asym] [--calibration FILE] [--calibration_samples 128]
      [--calibration_len 2048] [--act_order] [--damp 0.01] [--quantize_output]

SRC is any checkpoint `llama_jax.load` reads; DST is our own checkpoint with quantization.json,
which `llama_jax.load`, generate.py, `python -m llama_jax.evaluate`, the lm-eval adapter and the
server load as they load any model. Every projection of every block is quantized (the output head
with --quantize_output, the embedding never). Group size: default one group per output channel at
8 bits, 128 at 4 bits; 0 means per output channel. GPTQ reads --calibration (a .txt, or .jsonl with
a "text" field) as --calibration_samples windows of --calibration_len tokens. An existing DST is
replaced only when it holds our own model (a previous quantization, say) and nothing else; a folder
holding anything else (a Hugging Face checkpoint, a training workdir, other files) is refused before
anything is loaded, unless --overwrite (as `python -m llama_jax.convert`). Bad input is one line
(`error: ...`), exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_GROUP = {8: 0, 4: 128}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m llama_jax.quantize", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="the checkpoint to quantize (any kind llama_jax.load reads)")
  p.add_argument("--output", required=True,
                 help="directory to write: new, empty, or holding a llama_jax model, which is replaced "
                      "(anything else there is refused, see --overwrite)")
  p.add_argument("--overwrite", action="store_true",
                 help="write into an --output that holds something other than a llama_jax model: the "
                      "model's own files (params/, model_config.json, quantization.json, config.json, "
                      "the tokenizer's) are replaced or removed, other files stay; never a training workdir")
  p.add_argument("--bits", type=int, required=True, help="4 or 8")
  p.add_argument("--method", default="rtn", help="rtn (round-to-nearest, default) or gptq")
  p.add_argument("--group_size", type=int, default=None,
                 help="inputs per quantization group; 0: per output channel (default 0 at 8 bits, 128 at 4)")
  p.add_argument("--scheme", default="sym", help="sym (default) or asym (a zero point per group)")
  p.add_argument("--calibration", default=None, help="GPTQ: calibration text (.txt or .jsonl)")
  p.add_argument("--calibration_samples", type=int, default=128, help="GPTQ: windows of calibration text")
  p.add_argument("--calibration_len", type=int, default=None,
                 help="GPTQ: tokens per window (default min(2048, the model's max_seq_len))")
  p.add_argument("--act_order", action="store_true", help="GPTQ: inputs by decreasing Hessian diagonal")
  p.add_argument("--damp", type=float, default=0.01, help="GPTQ: dampening (fraction of mean diag H)")
  p.add_argument("--block_size", type=int, default=128, help="GPTQ: lazy batch size")
  p.add_argument("--batch_size", type=int, default=8, help="GPTQ: calibration windows per forward pass")
  p.add_argument("--quantize_output", action="store_true", help="quantize the output head too")
  p.add_argument("--seed", type=int, default=0, help="which calibration windows are taken")
  return p.parse_args(argv)


def quantize(args: argparse.Namespace) -> dict:
  from llama_jax.quantize.grid import Grid
  from llama_jax.quantize.layers import Options, check_widths

  if args.bits not in (4, 8):
    raise ValueError(f"--bits must be 4 or 8, got {args.bits}")
  if args.scheme not in ("sym", "asym"):
    raise ValueError(f"--scheme must be sym or asym, got {args.scheme!r}")
  if os.path.abspath(args.model) == os.path.abspath(args.output):
    raise ValueError(f"{args.output}: the output must not be the input")
  from llama_jax.convert.output import check_output
  check_output(args.output, "orbax", args.overwrite)
  group_size = DEFAULT_GROUP[args.bits] if args.group_size is None else args.group_size
  grid = Grid(args.bits, group_size, symmetric=args.scheme == "sym")
  options = Options(args.method, args.quantize_output, args.act_order, args.damp, args.block_size,
                    args.batch_size)
  if options.method == "gptq" and not args.calibration:
    raise ValueError("--method gptq needs --calibration FILE (text to fit the quantization to)")
  if options.method == "rtn" and args.calibration:
    raise ValueError("--calibration is only read by --method gptq")

  import jax
  import llama_jax
  from llama_jax import checkpoint, sharding
  from llama_jax.convert import source
  from llama_jax.quantize import calibration as calib
  from llama_jax.quantize.layers import quantize_params

  src = source.open_source(args.model)
  if src.quantization:
    raise ValueError(f"{args.model}: already quantized; quantize the float checkpoint it came from")
  check_widths(src.config, grid, options.quantize_output)  # before loading anything
  windows = None
  if options.method == "gptq":
    from llama_jax.evaluate.data import read_text
    from llama_jax.tokenizer import Tokenizer
    if not src.tokenizer_path:
      raise ValueError(f"{args.model}: no tokenizer.model to encode the calibration text with")
    seq_len = args.calibration_len or min(2048, src.config.max_seq_len)
    if not 2 <= seq_len <= src.config.max_seq_len:
      raise ValueError(f"--calibration_len must lie in [2, {src.config.max_seq_len}], got {seq_len}")
    if not os.path.isfile(args.calibration):  # before read_text judges its name
      raise ValueError(f"--calibration {args.calibration}: "
                       f"{'not a file' if os.path.exists(args.calibration) else 'no such file'}; "
                       'expected calibration text, a .txt or a .jsonl with a "text" field')
    tokens = Tokenizer(src.tokenizer_path).encode(read_text(args.calibration), bos=True)
    windows = calib.windows(tokens, args.calibration_samples, seq_len, args.seed, args.calibration)

  start = time.perf_counter()
  mesh = sharding.make_mesh() if jax.device_count() > 1 else None
  model = llama_jax.load(args.model, mesh=mesh)
  params, report = quantize_params(model.config, model.params, grid, options, windows, mesh,
                                   log=lambda line: print(line, file=sys.stderr))
  seconds = time.perf_counter() - start
  info = {"bits": args.bits, "group_size": group_size, "scheme": args.scheme, "method": options.method,
          "quantize_output": options.quantize_output, "source": os.path.abspath(args.model)}
  if options.method == "gptq":
    info.update(calibration=os.path.abspath(args.calibration), calibration_samples=int(windows.shape[0]),
                calibration_len=int(windows.shape[1]), act_order=options.act_order, damp=options.damp)
  # A previous model's tokenizer and reward-template record (convert's) are not this model's.
  checkpoint.save_model(args.output, model.config, params, src.tokenizer_path, quantization=info,
                        files={checkpoint.RUN_CONFIG: None}, replace_tokenizer=True)
  from llama_jax import projection
  summary = {"output": args.output, "seconds": round(seconds, 1),
             "bytes": projection.nbytes(params), "float_bytes": projection.nbytes(model.params)}
  if report:
    summary["mean_relative_error"] = {m: sum(r[m] for r in report) / len(report) for m in ("gptq", "rtn")}
  return summary


def main(argv=None) -> int:
  args = parse_args(argv)
  from llama_jax.convert import CheckpointError
  from llama_jax.errors import run_cli
  summary = run_cli(lambda: quantize(args), expected=(CheckpointError,))
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
