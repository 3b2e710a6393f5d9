"""A training run's directory: one run at a time holds it, it is checked before anything is written
into it, and what a run writes there is written whole.

The lock is `fcntl.flock` on DIR/lock (as py-filelock's `UnixFileLock` takes it): the kernel drops
it when the holding process ends in any way, `kill -9` included, so a workdir is never left locked
by a dead run. The holder writes who it is (pid, host, start time, command) into the file, and a
second run names it in its one-line refusal. The holder deletes the file on release, while still
holding the lock; a run that opened the old file just before then sees, once it has the lock, that
the path no longer leads to the file it locked, and tries again. On NFS, flock is emulated with
POSIX byte-range locks, which also end with their process (a dead client's locks go when its NFSv4
lease expires).

Process 0 of a run holds the lock for all of its processes; the others learn the outcome from it,
so every process fails the same way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any, Callable, Iterator

from llama_jax import checkpoint
from llama_jax.config import ModelConfig

LOCK = "lock"

# Fields that change only how the model is computed, not which function its parameters define: a
# resumed run may change them (another GPU, another memory budget).
RUNTIME_FIELDS = ("dtype", "attention_impl", "decode_attention", "decode_kernels", "remat_policy",
                  "scan_layers", "loss_chunk_len")


class WorkdirError(ValueError):
  """A workdir this run cannot use as asked; the message says what to do instead."""


class WorkdirBusy(WorkdirError):
  """Another run holds the workdir."""


def check_path(path: str) -> None:
  """Fails early, writing nothing, on a workdir that cannot be one."""
  if not path:
    raise WorkdirError("--workdir is empty: give the run a directory")
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {path} is a file, not a directory")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f"--workdir {path}: {existing} is a file, not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir {path}: {existing} is not writable")


def check_same_model(path: str, model_cfg: ModelConfig) -> None:
  """A workdir with checkpoints resumes only with the model that wrote them."""
  if not os.path.isfile(os.path.join(path, checkpoint.MODEL_CONFIG)):
    raise WorkdirError(f"{path} holds checkpoints but no {checkpoint.MODEL_CONFIG}, so they cannot be "
                       "matched to a model: restore the file, or use another --workdir")
  stored = checkpoint.read_model_config(path).to_dict()
  wanted = model_cfg.to_dict()
  differing = [f"model.{name} is {stored[name]} there, {wanted[name]} here" for name in sorted(wanted)
               if name not in RUNTIME_FIELDS and stored.get(name) != wanted[name]]
  if differing:
    raise WorkdirError(f"{path} holds checkpoints of another model: {'; '.join(differing)}. Use another "
                       "--workdir for a new model")


def write_if_changed(path: str, data: str | bytes) -> None:
  """Atomically, and only if the content differs: re-running a finished run rewrites nothing."""
  data = data.encode() if isinstance(data, str) else data
  if os.path.isfile(path):
    with open(path, "rb") as f:
      if f.read() == data:
        return
  checkpoint.write_atomic(path, data)


def _describe(holder: dict) -> str:
  if not holder:
    return "holder unknown"
  return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def _lock(path: str) -> int:
  """The descriptor of DIR/lock, exclusively locked, with this process's details in it."""
  lock_path = os.path.join(path, LOCK)
  while True:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        os.close(fd)
        raise
      try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
      except ValueError:  # the holder is between creating the file and writing it
        holder = {}
      os.close(fd)
      raise WorkdirBusy(f"{path} is in use by another run ({_describe(holder)}); wait for it to end or "
                        "use another --workdir") from None
    try:
      if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
        break
    except FileNotFoundError:
      pass
    os.close(fd)  # locked a file its holder had just deleted: take the new one
  holder = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(holder).encode(), 0)
  return fd


@contextlib.contextmanager
def hold(path: str, is_main: bool = True,
         gather: Callable[[Any], list[Any]] = lambda x: [x]) -> Iterator[None]:
  """Holds the workdir for the block: creates it if need be (and removes it again if the block
  leaves it empty: a refused run leaves nothing behind), locks it, and on any exit unlocks it and
  deletes the lock file. `is_main`: this process takes the lock; `gather`: every process's value,
  in process order (a collective), so that all of them see process 0's outcome."""
  created = []
  fd = None
  refusal = None
  if is_main:
    missing = os.path.abspath(path)
    while not os.path.exists(missing):
      created.append(missing)
      missing = os.path.dirname(missing)
    os.makedirs(path, exist_ok=True)
    try:
      fd = _lock(path)
    except WorkdirBusy as e:
      refusal = str(e)
  outcome = gather(refusal)[0]
  try:
    if outcome is not None:
      raise WorkdirBusy(outcome)
    yield
  finally:
    if fd is not None:
      os.unlink(os.path.join(path, LOCK))  # still holding the lock: see the module docstring
      os.close(fd)
    for directory in created:  # innermost first
      try:
        os.rmdir(directory)
      except OSError:  # not empty: the run wrote into it
        break
