"""Training checkpoints: an Orbax CheckpointManager over a workdir (layout in `checkpoint.py`).

Items per step: `params` and `opt_state` (sharded arrays, restorable onto any mesh), `meta` (step,
RNG) and `data` (every process's data-iterator state, gathered so that one JSON holds them all).
Saves are asynchronous; Orbax finalises a step directory only when every item is written.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llama_jax.checkpoint import CHECKPOINTS


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max(int(keep), 1), create=True, enable_async_checkpointing=True)
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


def save(manager: ocp.CheckpointManager, step: int, state, rng_seed: int, data_state: Any,
         force: bool = False) -> bool:
  data_states = gather_json(data_state)
  return manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.JsonSave({"step": int(step), "seed": int(rng_seed)}),
      data=ocp.args.JsonSave({"processes": data_states}),
  ), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state):
  """(params, opt_state, meta, this process's data state) at `step`, placed as the abstract
  targets' shardings say (which may be another mesh than the one that saved)."""
  out = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_opt_state),
      meta=ocp.args.JsonRestore(),
      data=ocp.args.JsonRestore(),
  ))
  states = out.data["processes"]
  if len(states) != jax.process_count():
    raise ValueError(
        f"checkpoint step {step} was written by {len(states)} processes, this run has "
        f"{jax.process_count()}: the data iterators cannot resume exactly")
  return out.params, out.opt_state, out.meta, states[jax.process_index()]
