"""Checkpoint conversion: anything `llama_jax.load` reads, out as our Orbax model or Hugging Face.

  python -m llama_jax.convert --input SRC --output DST [--to orbax|hf] [--dtype float32|bfloat16|float16]
      SRC: our saved model or training workdir (its latest step), a Hugging Face LLaMA directory
      (config.json + safetensors or pytorch_model*.bin) or a Meta directory (params.json +
      consolidated.NN.pth). --to orbax (default) writes what `Model.save` writes; --to hf writes
      config.json + generation_config.json + safetensors + the tokenizer's files for transformers.
      --dtype defaults to the dtype SRC is stored in. A reward model (a reward run, or one saved:
      a score head, no output head) is written whole: --to hf as LlamaForSequenceClassification;
      our format with the record of the chat template its run trained with (config.json holding
      the run config's recipe and its sources' templates, which `load_reward_model` reads).

  Vicuna-style deltas (FastChat's apply_delta / make_delta):
  python -m llama_jax.convert --input BASE --delta DELTA --output DST
      DST = BASE + DELTA, parameter by parameter; DELTA's extra vocabulary rows are kept.
  python -m llama_jax.convert --input TUNED --make_delta --base BASE --output DELTA
      DELTA = TUNED - BASE.
  Delta arithmetic is done in float32; --dtype sets the dtype written.

  LoRA runs (a training workdir with config.lora):
  python -m llama_jax.convert --input RUN --merge_lora --output DST [--base BASE] [--to orbax|hf]
      DST = the run's base model (its init_from, or BASE) with the adapters folded in, W + scale*a b;
      a quantized base is dequantized (the merged model is a float model). Another base than the
      one the adapters were trained on (shape or weights) is an error. A reward run's DST is the
      reward model: the merged backbone under its score head (--to hf: LlamaForSequenceClassification),
      with its template record as above.
  python -m llama_jax.convert --input RUN --to peft --output DIR
      the adapters in Hugging Face PEFT's layout (adapter_config.json + adapter_model.safetensors);
      not a reward run's (its score head: --merge_lora).

An existing --output (here and in `python -m llama_jax.quantize`) is written over only when it
holds a model of the format written (--to orbax: a saved model, --to hf: a Hugging Face export,
--to peft: PEFT adapters) and nothing that save does not replace: re-running a conversion replaces
the model (ours is swapped in whole with its files; a previous model's tokenizer files that the new
one does not have are removed). A folder holding anything else (a model of another format, a
training workdir, other files) is refused with one line naming what is there, before anything is
read or written; --overwrite writes into it anyway (the written model's own files are replaced or
removed, as when a model of the same format is replaced; other files stay), but never into a
training workdir, whose checkpoints a model at its top would shadow.

Conversion streams tensor by tensor into one copy of the model in host memory (see
`interop/layout.py`). Bad input prints one line naming the file, field or tensor, and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from llama_jax.config import DTYPES
from llama_jax.convert.output import check_output


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m llama_jax.convert",
      description="Convert LLaMA checkpoints between Orbax, Hugging Face and Meta formats.")
  p.add_argument("--input", required=True, help="source checkpoint (our own, Hugging Face or Meta)")
  p.add_argument("--output", required=True,
                 help="directory to write: new, empty, or holding a model of the --to format, which is "
                      "replaced (anything else there is refused, see --overwrite)")
  p.add_argument("--to", choices=("orbax", "hf", "peft"), default="orbax",
                 help="output format (default orbax; peft: a LoRA run's adapters for Hugging Face PEFT)")
  p.add_argument("--dtype", choices=DTYPES, default=None,
                 help="dtype of the written weights (default: as stored)")
  p.add_argument("--delta", default=None, help="a delta checkpoint to add to --input (Vicuna)")
  p.add_argument("--make_delta", action="store_true", help="write --input minus --base as a delta")
  p.add_argument("--base", default=None,
                 help="the base model a delta is made against (--make_delta), or LoRA adapters are "
                      "merged into (--merge_lora; default the run's init_from)")
  p.add_argument("--merge_lora", action="store_true", help="fold a LoRA run's adapters into its base model")
  p.add_argument("--overwrite", action="store_true",
                 help="write into an --output that holds something other than a model of the --to format "
                      "(refused without it): the files of the model written (ours: params/, "
                      "model_config.json, quantization.json, config.json and the tokenizer's; Hugging "
                      "Face's: config.json, generation_config.json, the safetensors and the tokenizer's) "
                      "are replaced or removed, other files stay. A model of that format is replaced "
                      "without it; a training workdir is refused even with it")
  args = p.parse_args(argv)
  if args.make_delta and not args.base:
    p.error("--make_delta needs --base BASE")
  if args.base and not (args.make_delta or args.merge_lora):
    p.error("--base is only used with --make_delta or --merge_lora")
  if args.make_delta and args.delta:
    p.error("--delta and --make_delta exclude each other")
  if args.merge_lora and (args.delta or args.make_delta):
    p.error("--merge_lora excludes --delta and --make_delta")
  if args.to == "peft" and (args.merge_lora or args.delta or args.make_delta):
    p.error("--to peft writes a LoRA run's adapters as they are: no --merge_lora, --delta or --make_delta")
  return args


def _to_device(params: dict, dtype: str) -> None:
  """Casts and moves leaves to the JAX device in place, one at a time, so two whole trees never
  coexist. Each transfer is awaited: `device_put` is asynchronous and holds its numpy source until
  the copy is done, so without the wait every source outlived the loop (measured: two copies of
  the model at the Orbax save). Orbax given numpy arrays makes copies of its own (about 2 more)."""
  import jax
  from llama_jax.convert import layout
  want = layout.np_dtype(dtype)
  for key in list(params):
    value = params[key]
    if isinstance(value, dict):
      _to_device(value, dtype)
      continue
    params[key] = None
    params[key] = jax.device_put(np.asarray(value, want)).block_until_ready()
    del value


def convert(args: argparse.Namespace) -> None:
  from llama_jax import checkpoint
  from llama_jax.convert import CheckpointError, delta, hf, source

  inputs = [args.input, args.delta, args.base]
  if args.merge_lora and not args.base and os.path.isfile(os.path.join(args.input, checkpoint.LORA)):
    from llama_jax.lora import files
    try:
      inputs.append(files.base_path(args.input))  # the base merged into, which the run still needs
    except ValueError:  # no base recorded: _merge_lora says so
      pass
  for path in inputs:
    if path and os.path.abspath(path) == os.path.abspath(args.output):
      raise CheckpointError(f"{args.output}: the output must not be an input")
  check_output(args.output, args.to, args.overwrite)  # (before anything is read)
  src = source.open_source(args.input)
  out_dtype = args.dtype or src.stored_dtype
  if (args.merge_lora or args.to == "peft") and src.kind != "lora":
    raise CheckpointError(f"{args.input}: not a LoRA run (a training workdir with lora.json)")
  if args.to == "peft":
    _export_peft(args.input, args.output)
    return
  if args.merge_lora:
    cfg, params = _merge_lora(args.input, args.base)
    tokenizer = src.tokenizer_path
  elif args.delta:
    other = source.open_source(args.delta)
    cfg, params = delta.apply_delta(src, other)
    tokenizer = other.tokenizer_path or src.tokenizer_path
  elif args.make_delta:
    base = source.open_source(args.base)
    cfg, params = delta.make_delta(src, base)
    tokenizer = src.tokenizer_path
  elif src.kind == "orbax" and _reward_model(args.input):
    # `score` in place of `output`: not a language model's tensors to stream, restored as what it is.
    from llama_jax.align.reward import load_reward_model
    rm = load_reward_model(args.input)
    cfg, params = rm.config, rm.params
    tokenizer = src.tokenizer_path
  else:
    cfg, params = source.load(src, out_dtype)
    tokenizer = src.tokenizer_path

  if args.to == "hf":
    hf.export_hf(cfg, params, args.output, tokenizer_path=tokenizer, dtype=out_dtype, generation=src.generation)
  else:
    # A reward model's template record goes in with its weights, as one save (None: an old one goes,
    # a language model's too).
    record = _trained_template_record(args.input) if "score" in params else None
    _to_device(params, out_dtype)
    # Without a tokenizer, the source's special ids and sampling defaults are kept as a file of
    # their own (an export to Hugging Face's format writes them again).
    ids = hf.generation_file(src.generation) if tokenizer is None else {}
    checkpoint.save_model(args.output, cfg.replace(param_dtype=out_dtype), params, tokenizer,
                          files={checkpoint.RUN_CONFIG: record, **ids}, replace_tokenizer=True)


def _reward_model(path: str) -> bool:
  """Whether our checkpoint at `path` (a saved model, a run, a LoRA run beside its adapters) holds a
  reward model's score head."""
  from llama_jax import checkpoint
  return "score" in (checkpoint.saved_keys(checkpoint.find_params_dir(path)[0]) or ())


def _trained_template_record(source: str) -> str | None:
  """A reward model's record of the chat template its run trained with, from `source`'s directory
  (a run's config, or a record this wrote), for the saved model's directory (its RUN_CONFIG):
  save_model writes no run config, and without one `score(template="auto")` renders in the
  tokenizer's template. The record is the run config cut to what `reward.trained_template` reads;
  None where none is recorded, or the sources disagree. (A config.json beside model_config.json is
  no Hugging Face config to our readers: `source.open_source` takes such a directory as our own
  checkpoint first, and the tokenizer finds no token ids in it.)"""
  from llama_jax import checkpoint
  from llama_jax.align.reward import read_trained_template
  config_dir = checkpoint.find_params_dir(source)[1]
  if read_trained_template(config_dir) is None:
    return None
  with open(os.path.join(config_dir, checkpoint.RUN_CONFIG)) as f:
    sources = json.load(f)["data"]["sources"]
  sources = {name: {k: s[k] for k in ("weight", "template") if k in s} for name, s in sources.items()}
  return json.dumps({"recipe": "reward", "data": {"sources": sources}}, indent=2)


def _merge_lora(run: str, base: str | None):
  import llama_jax
  from llama_jax.lora import files
  if _reward_model(run):  # the merged backbone under the run's score head: a reward model
    from llama_jax.align.reward import lora_reward_params
    params, cfg = lora_reward_params(run, base=base, merge=True)
    return cfg, params
  base = base or files.base_path(run)
  loaded = llama_jax.load(base)
  cfg, params, _ = files.adapt(run, loaded.config, loaded.params, base, merge=True)
  return cfg, params


def _export_peft(run: str, output: str) -> None:
  from llama_jax import checkpoint
  from llama_jax.convert import CheckpointError
  from llama_jax.lora import files, peft_format
  if _reward_model(run):
    raise CheckpointError(f"{run}: a reward run; its score head has no place among PEFT's causal-LM "
                          "adapters (--merge_lora writes the reward model whole)")
  lora, info = files.read_info(run)
  cfg = checkpoint.read_model_config(checkpoint.find_params_dir(run)[1])
  peft_format.export_peft(files.restore_adapters(run, cfg, lora), lora, output, info.get("base", ""))


def main(argv=None) -> int:
  args = parse_args(argv)
  start = time.perf_counter()
  try:
    convert(args)
  except (ValueError, OSError) as e:  # CheckpointError, TokenizerError, and bad input the model's code finds
    print(f"convert: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.output} ({args.to}) in {time.perf_counter() - start:.1f}s")
  return 0
