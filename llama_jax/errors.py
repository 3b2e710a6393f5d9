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


def run_cli(fn: Callable[[], T], expected: tuple = ()) -> T:
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    return fn()
  except EXPECTED + tuple(expected) as e:
    if os.environ.get("LLAMA_JAX_TRACEBACK"):
      raise
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
