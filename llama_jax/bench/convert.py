"""Time and peak memory of converting a ~1B-parameter checkpoint: Hugging Face -> Orbax -> Hugging Face.

  python -m llama_jax.bench convert [--workdir DIR] [--preset tinyllama_1b] [--keep]

Writes random weights of the preset's shape (TinyLlama 1.1B by default) as a bfloat16 Hugging Face
checkpoint, as TinyLlama ships it, then runs the real converter twice in fresh processes:
  1. hf (bfloat16) -> orbax, --dtype float32 (the training layout: 4 bytes a parameter)
  2. orbax -> hf, --dtype bfloat16
  3. hf -> hf, bfloat16 (no Orbax on either side: the streaming loader and writer alone)
and reports each one's wall time and peak resident memory (`ru_maxrss` of that process, from
`os.wait4`), next to the size of one float32 copy of the model. Finally checks the round trip is
exact (bfloat16 -> float32 -> bfloat16 loses nothing), tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from llama_jax.config import num_params, preset
from llama_jax.convert import hf, layout, safetensors_io


def write_random_hf(cfg, directory: str, seed: int = 0) -> None:
  """A bfloat16 Hugging Face checkpoint of random weights, generated and written one tensor at a time."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  bf16 = layout.np_dtype("bfloat16")
  specs = [(e.name, e.shape, bf16) for e in layout.entries(cfg)]
  shapes = {e.name: e.shape for e in layout.entries(cfg)}

  def produce(name):
    shape = shapes[name]
    if name.endswith("norm.weight"):
      return np.ones(shape, bf16)
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)
  safetensors_io.write_file(os.path.join(directory, "model.safetensors"), specs, produce)
  with open(os.path.join(directory, hf.CONFIG), "w") as f:
    json.dump(hf.config_to_hf(cfg, "bfloat16"), f, indent=2)


def run(argv: list[str]) -> tuple[float, float]:
  """(wall seconds, peak RSS in GiB) of `python -m llama_jax.convert argv` in a fresh process."""
  start = time.perf_counter()
  proc = subprocess.Popen([sys.executable, "-m", "llama_jax.convert", *argv])
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise SystemExit(f"convert {' '.join(argv)} failed with exit code {proc.returncode}")
  return time.perf_counter() - start, usage.ru_maxrss / 2**20  # Linux: ru_maxrss in KiB


def same_tensors(a: str, b: str) -> bool:
  other = dict(safetensors_io.iter_tensors(b))
  return all(np.array_equal(x.view(np.uint16), other[name].view(np.uint16))
             for name, x in safetensors_io.iter_tensors(a))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m llama_jax.bench convert", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
  p.add_argument("--preset", default="tinyllama_1b")
  p.add_argument("--keep", action="store_true", help="keep the written checkpoints")
  args = p.parse_args(argv)
  # TinyLlama's Hugging Face config: intermediate_size 5632 (Meta's rule with multiple_of 256 gives it too).
  cfg = preset(args.preset)
  work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
  src, mid, dst, dst2 = (os.path.join(work, n) for n in ("hf_src", "orbax", "hf_dst", "hf_dst2"))
  n = num_params(cfg)
  print(f"{args.preset}: {n / 1e9:.3f}B parameters; one float32 copy {4 * n / 2**30:.2f} GiB, "
        f"bfloat16 {2 * n / 2**30:.2f} GiB")
  start = time.perf_counter()
  write_random_hf(cfg, src)
  print(f"wrote random bfloat16 checkpoint in {time.perf_counter() - start:.1f}s")
  results = {
      "hf(bf16) -> orbax(f32)": run(["--input", src, "--output", mid, "--to", "orbax", "--dtype", "float32"]),
      "orbax(f32) -> hf(bf16)": run(["--input", mid, "--output", dst, "--to", "hf", "--dtype", "bfloat16"]),
      "hf(bf16) -> hf(bf16)": run(["--input", src, "--output", dst2, "--to", "hf"]),
  }
  exact = same_tensors(os.path.join(src, "model.safetensors"), os.path.join(dst, "model.safetensors"))
  for name, (seconds, rss) in results.items():
    print(f"{name}: {seconds:.1f}s wall, peak RSS {rss:.2f} GiB")
  print(f"round trip bit-exact: {exact}")
  if not args.keep:
    shutil.rmtree(work)
  return 0 if exact else 1


if __name__ == "__main__":
  sys.exit(main())
