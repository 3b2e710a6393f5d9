"""Where a converted or saved model may be written: `check_output` refuses a directory holding
another model, files a save would leave beside its own, or a training workdir."""

from __future__ import annotations

import fnmatch
import os

from llama_jax import checkpoint
from llama_jax.checkpoint import CheckpointError

# What a model of each format is called; `_writes` says what its save writes.
FORMAT_NAMES = {"orbax": "llama_jax model", "hf": "Hugging Face checkpoint", "peft": "PEFT adapter"}


def check_output(directory: str, to: str, overwrite: bool = False, command_line: bool = True,
                 flag: str = "--output") -> None:
  """Refuses an existing `directory` that holds anything but a model of the format `to` writes, with
  nothing beside it that the save would not replace (`_writes`): writing there would leave two models
  in one folder, each reader taking another (`llama_jax.load` ours, transformers a config.json), or
  our files among someone else's. An absent or empty directory is fine; `overwrite` skips the check,
  but not the refusal of a training workdir. `command_line`: the message names `flag` and
  --overwrite (else the directory and `overwrite=True`)."""
  named = f"{flag} {directory}" if command_line else directory
  if not os.path.exists(directory):
    return
  if not os.path.isdir(directory):
    raise CheckpointError(f"{named} is a file; expected a directory to write the model into")
  names = sorted(os.listdir(directory))
  if checkpoint.CHECKPOINTS in names:  # a model saved at its top would shadow its checkpoints, and
    # the save would replace its run config and tokenizer: refused even with --overwrite
    raise CheckpointError(f"{named} is a training workdir ({checkpoint.CHECKPOINTS}/): choose "
                          "another directory")
  if overwrite:
    return
  writes, marks = _writes(to)
  other = [n for n in names if not _matches(n, writes)]
  if not names or (not other and any(_matches(n, marks) for n in names)):
    return
  shown = [n + "/" if os.path.isdir(os.path.join(directory, n)) else n for n in other or names]
  listed = ", ".join(shown[:6]) + (f" and {len(shown) - 6} more" if len(shown) > 6 else "")
  found = _found(set(names), to)
  target = FORMAT_NAMES[to]
  what = (f"{found} ({listed}), not a {target}" if found else
          f"files a {target} does not have ({listed})" if other else f"{listed} but no {target}")
  flag = "pass --overwrite" if command_line else "pass overwrite=True"
  raise CheckpointError(f"{named} holds {what}: choose a new or empty directory, or {flag} to write "
                        "into it anyway")


def _writes(to: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(what a save of format `to` writes into its directory, the names that make a folder a model of
  that format), as fnmatch patterns, the leftovers of a save cut short included. A save rewrites or
  removes every name it writes, so a folder holding only these is one re-converted in place."""
  from llama_jax.convert import hf
  if to == "orbax":  # `checkpoint.save_model`
    return ((checkpoint.MODEL_CONFIG, "params", checkpoint.QUANTIZATION, checkpoint.RUN_CONFIG,
             *checkpoint.TOKENIZER_FILES, "params.partial*", "params.previous", "*.partial", "*.tmp*"),
            (checkpoint.MODEL_CONFIG, "params", "params.partial*"))
  if to == "hf":  # `hf.export_hf`
    return ((hf.CONFIG, hf.GENERATION_CONFIG, "model.safetensors", "model-*-of-*.safetensors",
             hf.SAFETENSORS_INDEX, *checkpoint.TOKENIZER_FILES, hf.STAGING, "*.tmp"),
            (hf.CONFIG, "model*.safetensors"))
  from llama_jax.lora import peft_format  # (a higher room: imported only when asked for)
  return (peft_format.CONFIG, peft_format.WEIGHTS), (peft_format.CONFIG, peft_format.WEIGHTS)


def _matches(name: str, patterns) -> bool:
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _found(names: set[str], to: str) -> str | None:
  """The checkpoint of another kind than `to` that a folder holding `names` is, in words, or None."""
  kinds = [
      ("orbax", "a llama_jax model", {"model_config.json", "params"} <= names),
      ("hf", "a Hugging Face checkpoint", "config.json" in names and "model_config.json" not in names
       and any(_matches(n, ("*.safetensors", "pytorch_model*.bin")) for n in names)),
      ("meta", "a Meta checkpoint", "params.json" in names and any(_matches(n, ("consolidated.*.pth",))
                                                                    for n in names)),
      ("peft", "a PEFT adapter", "adapter_config.json" in names),
  ]
  return next((words for kind, words, present in kinds if present and kind != to), None)
