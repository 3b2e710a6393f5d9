"""PyTorch weight files (`*.pth`, `pytorch_model*.bin`) read safely and lazily.

`torch.load(weights_only=True)` unpickles tensors and containers only, never arbitrary objects, so
a weight file cannot run code; `mmap=True` maps the file instead of reading it, so a tensor's pages
are read when it is converted. PyTorch is needed only for these formats (safetensors needs none).
"""

from __future__ import annotations

from typing import Any, Iterator

import ml_dtypes
import numpy as np

from llama_jax.convert import CheckpointError


def load(file: str) -> dict[str, Any]:
  """{name: torch.Tensor} of a PyTorch weight file, memory-mapped where the format allows."""
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{file}: reading PyTorch weight files needs PyTorch (pip install torch)") from None
  try:
    try:
      state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
      state = torch.load(file, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
  except FileNotFoundError:
    raise CheckpointError(f"{file}: missing") from None
  except Exception as e:  # the unpickler's refusals and corrupt archives come as many types
    raise CheckpointError(f"{file}: cannot read as PyTorch weights ({type(e).__name__}: {e})") from None
  if not isinstance(state, dict):
    raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a dict of tensors")
  return state


def to_numpy(tensor) -> np.ndarray:
  """A CPU torch tensor as numpy without a float32 detour (numpy has no bfloat16; ml_dtypes does)."""
  import torch
  tensor = tensor.detach()
  if tensor.dtype == torch.bfloat16:
    return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.contiguous().numpy()


def iter_tensors(file: str) -> Iterator[tuple[str, np.ndarray]]:
  for name, tensor in load(file).items():
    yield name, to_numpy(tensor)
