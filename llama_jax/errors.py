"""Command-line error handling shared by the entry points: expected errors are one line, no traceback."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

# Errors that a user's input can cause; anything else is a bug and keeps its traceback.
# LLAMA_JAX_TRACEBACK=1 keeps the traceback of these too.
EXPECTED = (ValueError, OSError, KeyError)


class UsageError(ValueError):
  """A command line that cannot run (a missing file, an unknown flag or key): exit code 2, as
  absl and argparse give for a bad flag; other expected errors give 1."""


def quiet_logs() -> None:
  """Leaves out log lines that tell a user nothing: JAX probing for a TPU on every CPU/GPU run
  ("Unable to initialize backend 'tpu'", INFO, shown by absl's handler under app.run)."""
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def run_cli(fn: Callable[[], T], expected: tuple = ()) -> T:
  quiet_logs()
  try:
    return fn()
  except EXPECTED + tuple(expected) as e:
    if os.environ.get("LLAMA_JAX_TRACEBACK"):
      raise
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2 if isinstance(e, UsageError) else 1)
