"""Throughput accounting and the one metrics writer (JSON lines + TensorBoard events).

The writer flushes both files at every log line, so a killed run leaves every step it logged; a
resumed run first drops the rows after its checkpoint's step from metrics.jsonl and starts its
TensorBoard file with a SessionLog START at the step after it, which TensorBoard reads as "forget
the events from here on" (tf.summary's purge of orphaned data), so each step is shown once.

Model FLOPs per token (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B):
  6 * N                 forward (2N) and backward (4N) of every matmul weight, N excluding the
                        embedding table (a lookup, not a matmul) and the RMSNorm weights (vectors)
                        but including the output head;
  + 6 * L * T * D       attention scores and weighted values: 2 matmuls of 2*T*D FLOPs per token per
                        layer forward, x3 with the backward pass, halved because a causal mask needs
                        only the lower triangle.
MFU = achieved model FLOPs per second / (devices * peak dense FLOP/s of one device). Rematerialised
recomputation is not counted: MFU, unlike hardware utilisation, credits only the model's own work.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Callable, Mapping

import jax

from llama_jax.config import ModelConfig, num_params

# Dense peak FLOP/s per device from the vendors' datasheets (no sparsity), by compute dtype (float32
# as TF32 on NVIDIA). Matched in order against the lower-cased device kind, every word of the key
# present, so the PCIe and NVL H100/H200 (lower clocks and power) are not taken for the SXM parts.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    ("h100 nvl", {"bfloat16": 835e12, "float16": 835e12, "float32": 418e12}),
    ("h200 nvl", {"bfloat16": 835e12, "float16": 835e12, "float32": 418e12}),
    ("h100", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),  # SXM5 ("H100 80GB HBM3")
    ("h200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),  # SXM, and GH200
    ("a100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("tpu v6 lite", {"bfloat16": 918e12, "float32": 918e12}),
    ("tpu v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("tpu v5", {"bfloat16": 459e12, "float32": 459e12}),
    ("tpu v4", {"bfloat16": 275e12, "float32": 275e12}),
)


def flops_per_token(cfg: ModelConfig, seq_len: int, frozen_weights: bool = False) -> float:
  """Model FLOPs of one trained token: 6 per matmul weight (forward 2, input and weight gradients
  2 each) and causal attention's 6LTD. `frozen_weights` (LoRA's frozen base): no weight gradients,
  4 per weight; the low-rank adapters' own FLOPs (rank << width) are not counted."""
  norm_weights = (2 * cfg.n_layers + 1) * cfg.dim  # vectors, not matmul weights
  lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim  # tied: the table is the head too
  matmul_params = num_params(cfg) - lookup - norm_weights
  return (4.0 if frozen_weights else 6.0) * matmul_params + 6.0 * cfg.n_layers * seq_len * cfg.dim


def peak_flops(device: jax.Device, dtype: str) -> float | None:
  """Peak of one device, or None where unknown (a CPU): then MFU is not reported, not guessed."""
  words = device.device_kind.lower().replace("-", " ").split()
  for key, table in PEAK_FLOPS:
    if all(any(k in w for w in words) for k in key.split()):
      return table.get(dtype, table["bfloat16"])
  return None


class StepTimer:
  """Seconds per training step over a logging window. Time spent outside training steps
  (evaluations) is left out while the window's steps keep their own time, so a window that an
  evaluation interrupts reports what its steps took, not its steps over a part of their time."""

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self.clock = clock
    self.started = False
    self._begin, self._steps, self._excluded = 0.0, 0, 0.0

  def start(self) -> None:
    """Opens a window (after the first step, whose time is compilation)."""
    self.started = True
    self._begin, self._steps, self._excluded = self.clock(), 0, 0.0

  def count_step(self) -> None:
    self._steps += 1

  @contextlib.contextmanager
  def paused(self):
    begin = self.clock()
    try:
      yield
    finally:
      self._excluded += self.clock() - begin

  def lap(self) -> float | None:
    """Seconds per step since the window opened (None if no step was counted); opens the next."""
    if not self.started or not self._steps:
      return None
    seconds = (self.clock() - self._begin - self._excluded) / self._steps
    self.start()
    return seconds


class MetricsWriter:
  """Writes `DIR/metrics.jsonl` and TensorBoard events in DIR; only process 0 writes. A run that
  resumes at `start_step` replaces what a crashed run logged after it; files are opened at the
  first row, so a run that logs nothing leaves the workdir's files as they were."""

  def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0):
    self.enabled = enabled
    self.workdir = workdir
    self.start_step = int(start_step)
    self._jsonl = None
    self._tb = None
    if enabled:
      _drop_rows_after(os.path.join(workdir, "metrics.jsonl"), self.start_step)

  def _open(self) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a")
    try:
      self._tb = _EventFile(self.workdir, purge_from=self.start_step + 1)
    except ImportError:  # TensorBoard files are a convenience; the JSON lines are the record
      self._tb = None

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    if self._jsonl is None:
      self._open()
    row = {"step": int(step)}
    scalars = {}
    for key, value in metrics.items():
      value = float(value)
      row[key] = value if math.isfinite(value) else str(value)
      if math.isfinite(value):
        scalars[key] = value
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.write(int(step), scalars)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl (atomically, and only if there is something to drop) without the rows
  after `step`: a crashed run logged them, and the resumed run logs them again."""
  if not os.path.isfile(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row_step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by the crash
      continue
    if row_step <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if kept != lines:
    from llama_jax.checkpoint import write_atomic
    write_atomic(path, "".join(kept))


@contextlib.contextmanager
def _without_torch():
  """Imports inside see PyTorch as not installed, unless something imported it already.

  tensorboardX's package imports torch when it can (for its own tensor type), which costs a JAX
  process ~2.5 s at start and PyTorch's memory; its event files never use it.
  """
  if "torch" in sys.modules:
    yield
    return
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
  try:
    yield
  finally:
    if sys.modules.get("torch", ...) is None:
      del sys.modules["torch"]


class _EventFile:
  """A TensorBoard event file written synchronously: tensorboardX's SummaryWriter queues events for
  a thread that flushes every two minutes, so a killed run lost them; here each row is on disk
  when `write` returns."""

  def __init__(self, logdir: str, purge_from: int):
    with _without_torch():
      from tensorboardX.event_file_writer import EventsWriter
      from tensorboardX.proto.event_pb2 import Event, SessionLog
      from tensorboardX.proto.summary_pb2 import Summary
    self._event, self._summary = Event, Summary
    # The pid in the name: a resumed run may start within the second its killed predecessor did.
    self._writer = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}")
    self._writer.write_event(Event(step=purge_from, wall_time=time.time(),
                                   session_log=SessionLog(status=SessionLog.START)))
    self._writer.flush()

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    values = [self._summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
    self._writer.write_event(self._event(step=step, wall_time=time.time(), summary=self._summary(value=values)))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
