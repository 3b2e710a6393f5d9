"""The project's own checkpoints, in Orbax: saved models, training workdirs, and reading them.

Two layouts, one parameter format:
  a saved model:      DIR/model_config.json, DIR/params/ (Orbax), the tokenizer's files (optional:
                      tokenizer.model or tokenizer.json, with tokenizer_config.json etc.)
  a training workdir: DIR/model_config.json, the tokenizer's files, DIR/checkpoints/<step>/{params,
                      opt_state, meta, data}/ written by an Orbax CheckpointManager
                      (`make_manager`, `save_state`, `restore_state`). Orbax writes a step to a
                      temporary name and renames it when complete, so a save killed mid-write is
                      never listed as a step.
A quantized model (`python -m llama_jax.quantize`) also has DIR/quantization.json, which describes
each quantized weight (`projection.describe`); its arrays are saved as {values, scales[, zeros]}.
A LoRA run's workdir (`config.lora`) also has DIR/lora.json (the adapters' shape and their base
model); its steps' `params` are the adapters alone (`llama_jax.lora`).
Items of a training step: `params` and `opt_state` (sharded arrays, restorable onto any mesh),
`meta` (step, seed) and `data` (every process's data-iterator state, gathered into one JSON).

A checkpoint that cannot be read (a truncated or overwritten array file, an emptied `_METADATA` or
`manifest.ocdbt`) raises `CheckpointError`, one line naming the directory and the file or parameter;
resuming falls back to the next older step (`restore_newest`) and moves the unreadable ones aside,
never deleting them (`set_aside`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import threading
from typing import Any, Iterator

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from llama_jax import projection
from llama_jax.config import ModelConfig

MODEL_CONFIG = "model_config.json"
QUANTIZATION = "quantization.json"
LORA = "lora.json"
TOKENIZER = "tokenizer.model"  # a SentencePiece tokenizer's file (a tokenizer.json folder has others)
# Every file a tokenizer's save writes, either backend (`Tokenizer.save`; llama_jax/tokenizer/files.py
# names them): in a saved model's folder they are its tokenizer's alone, so a save removes those it
# does not write (a previous model's tokenizer.json would be read before a new tokenizer.model, its
# generation_config.json would add its EOS ids).
TOKENIZER_FILES = ("tokenizer.json", TOKENIZER, "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
CHECKPOINTS = "checkpoints"
RUN_CONFIG = "config.json"  # a training workdir's: the whole run config, as the loop last ran it
DAMAGED = "damaged_checkpoints"  # beside CHECKPOINTS: unreadable steps, moved out of the manager's way


class CheckpointError(ValueError):
  """A checkpoint this project cannot read: the message names the file, field or tensor."""


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes `path` whole or not at all: a temporary file beside it, synced, then renamed over it."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def model_config_json(config: ModelConfig) -> str:
  return json.dumps(config.to_dict(), indent=2)


def write_model_config(directory: str, config: ModelConfig) -> None:
  os.makedirs(directory, exist_ok=True)
  write_atomic(os.path.join(directory, MODEL_CONFIG), model_config_json(config))


def read_model_config(directory: str) -> ModelConfig:
  path = os.path.join(directory, MODEL_CONFIG)
  try:
    with open(path) as f:
      return ModelConfig.from_dict(json.load(f))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
  except (TypeError, ValueError) as e:  # a JSON that is not a model config
    raise CheckpointError(f"{path}: {e}") from None


# --- naming what is damaged: Orbax and tensorstore report a bad file deep inside long messages

_JSON_FILES = ("_METADATA", "_sharding", "_CHECKPOINT_METADATA", "metadata")  # "metadata": a JSON item
_TENSORSTORE_CODE = re.compile(r"^[A-Z_]+: ")
_DRIVER = re.compile(r'Error opening "[^"]*" driver: ')
_LOCAL_FILE = re.compile(r'Error (?:decoding|reading) local file "([^"]+)": (.*)')
_OCDBT_KEY = re.compile(r'Error reading "([^"/]+)/[^"]*" in OCDBT database at local file "([^"]+)": (.*)')


def _first_bad_file(directory: str) -> str | None:
  """The first of an Orbax item's small metadata files that is empty or not JSON, as 'name: why'."""
  candidates = [os.path.join(directory, name) for name in _JSON_FILES]
  for root, _, names in os.walk(directory):
    for name in sorted(names):
      if name == "manifest.ocdbt" or os.path.basename(root) == "array_metadatas":
        candidates.append(os.path.join(root, name))
  for path in candidates:
    if not os.path.isfile(path):
      continue
    where = os.path.relpath(path, directory)
    if os.path.getsize(path) == 0:
      return f"{where}: the file is empty"
    if not path.endswith(".ocdbt"):
      try:
        with open(path, "rb") as f:
          json.loads(f.read())
      except (ValueError, UnicodeDecodeError) as e:
        return f"{where}: not JSON ({e})"
  return None


def _is_abandoned_read(error: BaseException | None) -> bool:
  seen = 0
  while error is not None and seen < 10:
    text = str(error)
    if (isinstance(error, GeneratorExit) or "error while reading array index" in text
        or text == "Event loop is closed"):  # a read finishing after its restore gave up
      return True
    error, seen = error.__cause__ or error.__context__, seen + 1
  return False


class _AbandonedReads(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for the array reads a failed restore left
  behind: those that failed as it gave up (`_is_abandoned_read`), and Orbax's `async_deserialize`
  tasks that failed as the one it raised did (each array of a checkpoint whose manifest is empty
  fails alike; only the first failure is awaited). Other tasks' records pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = str(record.msg)
    if "never retrieved" not in text:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not (_is_abandoned_read(error) or "coro=<async_deserialize()" in text)


def _quiet_abandoned_reads() -> None:
  """After a failed restore, Orbax's other array reads of the same restore are left behind: asyncio
  logs each failed one as "Task exception was never retrieved", and those closed by the garbage
  collector turn their GeneratorExit into an Exception (`except BaseException` around the read in
  orbax's serialization.py) that Python prints as "Exception ignored in <coroutine>", and reads that
  finish after the restore's event loop closed print "Event loop is closed": 160 lines and more for
  one damaged file, all saying what the CheckpointError already says in one. A read's callback that
  finds the loop closed from tensorstore's own thread is printed through `sys.excepthook` (seen
  once in 100s of runs: a bare "Traceback ... RuntimeError: Event loop is closed"), or
  `threading.excepthook` from a Python thread: those hooks skip it too, and only it. Installed
  before each restore, not after its failure: an abandoned read can print before the failure
  reaches `unreadable` (seen in a full test run: four such tracebacks ahead of the one-line error)."""
  previous = sys.unraisablehook
  if getattr(previous, "quiets_abandoned_reads", False):
    return

  def hook(unraisable):
    if not _is_abandoned_read(unraisable.exc_value):
      previous(unraisable)

  previous_except, previous_thread = sys.excepthook, threading.excepthook

  def excepthook(kind, value, traceback):
    if not _is_abandoned_read(value):
      previous_except(kind, value, traceback)

  def thread_hook(args):
    if not _is_abandoned_read(args.exc_value):
      previous_thread(args)

  hook.quiets_abandoned_reads = True
  sys.unraisablehook, sys.excepthook, threading.excepthook = hook, excepthook, thread_hook
  logging.getLogger("asyncio").addFilter(_AbandonedReads())


def unreadable(directory: str, error: BaseException) -> CheckpointError:
  """`error`, raised while reading the Orbax checkpoint `directory` (one item, or a training step's
  directory of items), as one line naming the item and the file or parameter that failed."""
  _quiet_abandoned_reads()
  chain, e = [], error
  while e is not None and len(chain) < 20:
    chain.append(e)
    e = e.__cause__ or e.__context__
  for e in reversed(chain):  # the innermost tensorstore message names the file or the parameter
    text = _DRIVER.sub("", _TENSORSTORE_CODE.sub("", str(e).split(" [tensorstore_spec")[0].strip()))
    local = _LOCAL_FILE.search(text)
    if local:
      path, reason = local.groups()
      return CheckpointError(f"checkpoint {os.path.dirname(path)} cannot be read: "
                             f"{os.path.basename(path)}: {reason}")
    key = _OCDBT_KEY.search(text)
    if key:
      param, item, reason = key.groups()
      return CheckpointError(f"checkpoint {item.rstrip('/')} cannot be read: parameter {param}: {reason}")
  if not os.path.isdir(directory):
    return CheckpointError(f"checkpoint {directory} cannot be read: no such directory")
  # A JSON file Orbax could not parse (its error names no file): the item, or a step's items.
  items = [directory] + [os.path.join(directory, n) for n in sorted(os.listdir(directory))
                         if os.path.isdir(os.path.join(directory, n))]
  for item in items:
    bad = _first_bad_file(item)
    if bad:
      return CheckpointError(f"checkpoint {item} cannot be read: {bad}")
  message = " ".join(str(error).split())
  message = message if len(message) <= 300 else message[:300] + "..."
  return CheckpointError(f"checkpoint {directory} cannot be read: {type(error).__name__}: {message}")


def _other_steps(params_dir: str) -> str:
  """For a step of a training workdir, where to find the workdir's other steps ('' otherwise)."""
  step_dir = os.path.dirname(params_dir)
  root = os.path.dirname(step_dir)
  if os.path.basename(root) != CHECKPOINTS or not os.path.basename(step_dir).isdigit():
    return ""
  others = [s for s in checkpoint_steps(os.path.dirname(root)) if str(s) != os.path.basename(step_dir)]
  if not others:
    return ""
  return (f" (the workdir's other checkpoints: steps {', '.join(map(str, others))}; pass "
          f"{os.path.join(root, str(others[-1]))} to use one)")


def abstract_params(config: ModelConfig, shardings: Any = None) -> Any:
  """ShapeDtypeStructs of the parameters, placed by `shardings` (default: the first device)."""
  from llama_jax.model import param_shapes
  shapes = nn.unbox(param_shapes(config))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def read_quantization(directory: str) -> dict | None:
  """The quantization.json of a model directory ({"weights": {path: ...}, ...}), or None."""
  path = os.path.join(directory, QUANTIZATION)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None


def tokenizer_for(path: str | None, vocab_size: int):
  """The tokenizer at `path` (a file or folder `load_tokenizer` reads; None: none), checked to fit a
  model of `vocab_size` rows. Writers load it before any weight, so that a bad tokenizer leaves no
  half-written output."""
  if not path:
    return None
  from llama_jax.tokenizer import load_tokenizer
  tok = load_tokenizer(path)
  if tok.vocab_size > vocab_size:
    raise CheckpointError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model's "
                          f"embedding has {vocab_size} rows")
  return tok


def save_model(directory: str, config: ModelConfig, params: Any, tokenizer=None,
               quantization: dict | None = None, files: dict[str, str | None] | None = None,
               replace_tokenizer: bool = False) -> None:
  """`tokenizer`: a path `tokenizer_for` reads, or a loaded tokenizer (what its `save` writes, its
  in-memory chat template included). `quantization`: how the model was quantized (method,
  calibration), written to quantization.json beside the description of its quantized weights.
  `files`: other files that describe these weights (name -> text; None: none, an old one is
  removed; a reward model's template record, `convert`). All of these, and the tokenizer's files,
  are swapped in with the weights; a previous model's TOKENIZER_FILES that the new tokenizer does
  not write are removed then. Without a tokenizer those files are left as they are, unless
  `replace_tokenizer`: the model has none, and a previous model's must not pass for its own."""
  if isinstance(tokenizer, (str, os.PathLike)) or tokenizer is None:
    tokenizer = tokenizer_for(tokenizer and os.fspath(tokenizer), config.vocab_size)  # a bad one fails before any write
  elif tokenizer.vocab_size > config.vocab_size:
    raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
                          f"{config.vocab_size} rows")
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  params_dir = os.path.join(directory, "params")
  weights = projection.describe(params)
  files = {**(files or {}), MODEL_CONFIG: model_config_json(config), QUANTIZATION: (
      json.dumps({**(quantization or {}), "weights": weights}, indent=2) if weights else None)}
  # The new weights and the files that describe them (the tokenizer's too) are written beside the
  # old ones and swapped in once complete: a crash before the swap leaves the old model whole, one
  # during it leaves no params/ (an error to every reader; both models' weights on disk), one after
  # it the new model whole: never new weights beside an old model's files or the reverse.
  # (Every process of a multi-host save writes its shards; process 0 alone writes and moves the rest.)
  main = jax.process_index() == 0
  staging, previous = params_dir + ".partial", params_dir + ".previous"
  staged = {name: os.path.join(directory, name) + ".partial" for name in files}
  staged_tokenizer = os.path.join(directory, "tokenizer.partial")
  for leftover in (staging, previous, staged_tokenizer, *staged.values()) if main else ():
    if os.path.isdir(leftover):
      shutil.rmtree(leftover)
    elif os.path.exists(leftover):
      os.remove(leftover)
  multihost_utils.sync_global_devices("save_model: leftovers removed")
  # Uncompressed: with zstd on, tensorstore keeps every array's compressed chunks in host memory
  # until the commit (measured: +0.95 of the model's size, and 2.3x the time); float weights
  # compress by only ~10%. Reading needs no flag either way.
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
    ckptr.save(staging, args=ocp.args.PyTreeSave(projection.to_saved(params)))
  if main:
    for name, text in files.items():
      if text is not None:
        write_atomic(staged[name], text)
    swap_tokenizer = tokenizer is not None or replace_tokenizer
    if tokenizer is not None:  # saved beside first: what it writes is known, and a bad save changes nothing
      tokenizer.save(staged_tokenizer)
    if os.path.exists(params_dir):
      os.rename(params_dir, previous)
    # Renames only, from here to the weights' own. The tokenizer's files first: `files` may hold
    # one of TOKENIZER_FILES of a model without a tokenizer (its generation_config.json).
    if swap_tokenizer:
      move_staged(directory, staged_tokenizer if tokenizer is not None else None)
    for name, text in files.items():
      target = os.path.join(directory, name)
      if text is not None:
        os.replace(staged[name], target)
      elif os.path.exists(target):
        os.remove(target)
    os.rename(staging, params_dir)
  multihost_utils.sync_global_devices("save_model: weights in place")
  if main and os.path.exists(previous):
    shutil.rmtree(previous)


def move_staged(directory: str, staged: str | None, last: str | None = None) -> None:
  """The files saved in the folder `staged` (None: none) moved into `directory`, `last` after all
  the others; first the TOKENIZER_FILES of `directory` that `staged` does not hold go: a previous
  model's tokenizer.json would be read before a new tokenizer.model, its generation_config.json
  would add its EOS ids. (`save_model`'s tokenizer, `hf.export_hf`'s whole export.)"""
  written = sorted(os.listdir(staged)) if staged else []
  for name in TOKENIZER_FILES:
    path = os.path.join(directory, name)
    if name not in written and os.path.isfile(path):
      os.remove(path)
  for name in sorted(written, key=lambda name: name == last):  # (a stable sort: `last` moves last)
    os.replace(os.path.join(staged, name), os.path.join(directory, name))
  if staged:
    os.rmdir(staged)


def checkpoint_steps(workdir: str) -> list[int]:
  """The complete steps of a training workdir, oldest first (Orbax renames a step into place when
  it is complete, so a step directory is one)."""
  root = os.path.join(workdir, CHECKPOINTS)
  if not os.path.isdir(root):
    return []
  return sorted(int(name) for name in os.listdir(root) if name.isdigit())


def latest_step(workdir: str) -> int | None:
  steps = checkpoint_steps(workdir)
  return steps[-1] if steps else None


def find_params_dir(path: str) -> tuple[str, str]:
  """(params directory, directory holding model_config.json) for a saved model, a training workdir
  (its latest step) or one step directory of a workdir."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, MODEL_CONFIG)) and os.path.isdir(os.path.join(path, "params")):
    return os.path.join(path, "params"), path
  if os.path.isfile(os.path.join(path, MODEL_CONFIG)) and os.path.isdir(os.path.join(path, CHECKPOINTS)):
    step = latest_step(path)
    if step is None:
      raise FileNotFoundError(f"{path}: training workdir has no complete checkpoint yet")
    return os.path.join(path, CHECKPOINTS, str(step), "params"), path
  workdir = os.path.dirname(os.path.dirname(path))
  if os.path.isdir(os.path.join(path, "params")) and os.path.isfile(os.path.join(workdir, MODEL_CONFIG)):
    return os.path.join(path, "params"), workdir
  raise FileNotFoundError(f"{path}: not a llama_jax model directory or training workdir")


def is_own_checkpoint(path: str) -> bool:
  try:
    find_params_dir(path)
    return True
  except FileNotFoundError:
    return False


def load_params(params_dir: str, config: ModelConfig, shardings: Any = None,
                quantization: dict | None = None, backbone: bool = False) -> Any:
  """The model's parameters, placed by `shardings` (of the plain tree; quantized weights, described
  by `quantization` (`read_quantization`), follow them). A tree saved with heads beside the model's
  parameters (a PPO policy's value head, llama_jax.align) gives the model's part. `backbone`: all
  but the output head, which is not read (a reward model's tree has none)."""
  abstract = abstract_params(config, shardings)
  weights = quantization["weights"] if quantization else {}
  if weights:
    abstract = projection.abstract_saved(abstract, weights)
  if backbone:
    abstract = {k: v for k, v in abstract.items() if k != "output"}
    weights = {name: d for name, d in weights.items() if name.split("/")[0] != "output"}
  params = restore_tree(params_dir, abstract, partial=True)
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, jax.ShapeDtypeStruct):  # a partial restore's target for a key it lacks
      raise CheckpointError(f"checkpoint {params_dir} has no parameter "
                            f"{'/'.join(str(getattr(k, 'key', k)) for k in key_path)}")
  return projection.from_saved(params, weights) if weights else params


def restore_tree(params_dir: str, target: Any, partial: bool = False) -> Any:
  """A saved parameter tree as `target`'s ShapeDtypeStructs say (shapes, dtypes, shardings);
  `partial`: `target` may be a part of what was saved. A checkpoint that cannot be read is one
  CheckpointError line."""
  _quiet_abandoned_reads()
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
      return ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=partial))
  except Exception as e:  # noqa: BLE001 -- Orbax wraps tensorstore's errors in plain Exceptions
    raise CheckpointError(f"{unreadable(params_dir, e)}{_other_steps(params_dir)}") from e


def saved_keys(params_dir: str) -> list[str] | None:
  """The top-level keys of a saved parameter tree, from its metadata (None where that does not
  read: restoring then says why)."""
  # The handler's own metadata: a Checkpointer's also looks for the step metadata that a training
  # step's `params` item does not have (it is the step's), and logs a warning for it.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return sorted(handler.metadata(epath.Path(params_dir)).tree)
  except Exception:  # noqa: BLE001 -- a damaged checkpoint: its restore names the file
    return None
  finally:
    handler.close()


def restore_host_leaves(params_dir: str, config: ModelConfig,
                        dtype: Any = None) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """(path, numpy array in `dtype`, default as stored) for each parameter, one at a time: each is
  its own partial restore, so host memory holds one parameter rather than the model."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(abstract_params(config))
  _quiet_abandoned_reads()
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    for key_path, leaf in leaves:
      path = tuple(k.key for k in key_path)
      item = traverse_util.unflatten_dict({path: leaf})
      args = traverse_util.unflatten_dict({path: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)})
      try:
        out = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True))
      except Exception as e:  # noqa: BLE001 -- as in load_params
        raise CheckpointError(f"{unreadable(params_dir, e)}{_other_steps(params_dir)}") from e
      out = traverse_util.flatten_dict(out)[path]
      if not isinstance(out, np.ndarray):  # a partial restore hands back the target of a key it lacks
        raise CheckpointError(f"checkpoint {params_dir} has no parameter {'/'.join(path)}")
      yield path, out
      del out  # before the next restore: two parameters at once would be the peak


def model_files(path: str) -> tuple[str, ModelConfig, str | None]:
  """(params directory, config, tokenizer path or None) of a saved model or a training workdir;
  the tokenizer path is the folder holding its files."""
  from llama_jax.tokenizer import has_tokenizer
  params_dir, config_dir = find_params_dir(path)
  return params_dir, read_model_config(config_dir), (config_dir if has_tokenizer(config_dir) else None)


# --- training workdirs: the state of a run, step by step

def make_manager(workdir: str, keep: int, create: bool = True) -> ocp.CheckpointManager:
  """`create=False` reads an existing workdir without writing to it (resuming: the first write of a
  run comes after every check)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max(int(keep), 1), create=create, enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, CHECKPOINTS)), options=options,
      item_names=("params", "opt_state", "meta", "data"))


def gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able `obj`, in process order (a collective: all processes call it)."""
  if jax.process_count() == 1:
    return [obj]
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([raw.size], np.int64))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  everything = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(everything, lengths.ravel())]


def save_state(manager: ocp.CheckpointManager, step: int, state, rng_seed: int, data_state: Any,
         force: bool = False) -> bool:
  data_states = gather_json(data_state)
  return manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.JsonSave({"step": int(step), "seed": int(rng_seed)}),
      data=ocp.args.JsonSave({"processes": data_states}),
  ), force=force)


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state):
  """(params, opt_state, meta, every saving process's data state) at `step`, placed as the
  abstract targets' shardings say (which may be another mesh than the one that saved);
  `data.resume_state` picks this process's."""
  _quiet_abandoned_reads()
  try:
    out = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        meta=ocp.args.JsonRestore(),
        data=ocp.args.JsonRestore(),
    ))
    states = out.data["processes"]
  except Exception as e:  # noqa: BLE001 -- as in load_params
    raise unreadable(os.path.join(str(manager.directory), str(step)), e) from e
  return out.params, out.opt_state, out.meta, states


def restore_newest(manager: ocp.CheckpointManager, abstract_params, abstract_opt_state,
                   warn) -> tuple[int, tuple, list[int]]:
  """(step, `restore_state`'s tuple, the newer steps that could not be read) for the newest step
  that reads; each unreadable one is reported through `warn`, in one line, and left where it is."""
  steps = sorted(manager.all_steps(), reverse=True)
  skipped = []
  for step in steps:
    try:
      return step, restore_state(manager, step, abstract_params, abstract_opt_state), skipped
    except CheckpointError as e:
      warn(str(e))
      skipped.append(step)
  raise CheckpointError(f"no checkpoint in {manager.directory} can be read (steps "
                        f"{', '.join(map(str, steps))}); nothing was moved or deleted")


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> list[str]:
  """Moves unreadable steps to DAMAGED beside the checkpoints (kept for a look, out of the way of
  the steps the resumed run saves again); their new paths."""
  moved = []
  if jax.process_index() == 0:
    root = os.path.join(os.path.dirname(str(manager.directory)), DAMAGED)
    os.makedirs(root, exist_ok=True)
    for step in steps:
      target, n = os.path.join(root, str(step)), 1
      while os.path.exists(target):
        target, n = os.path.join(root, f"{step}.{n}"), n + 1
      os.rename(os.path.join(str(manager.directory), str(step)), target)
      moved.append(target)
  multihost_utils.sync_global_devices("damaged checkpoints set aside")
  manager.reload()
  return moved
