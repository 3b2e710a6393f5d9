"""The embedded default corpus: real text that ships with every Python interpreter, so the tiny
config trains on a mixture with no download.

  code:  the standard library's own .py files (sysconfig's 'stdlib' path, without site-packages),
         one document per file.
  prose: the documentation shipped with the interpreter: the `pydoc_data.topics` pages (the
         language reference topics `help()` shows) and, per module, its module, class and function
         docstrings (read with `ast`, not by importing: some modules act on import).

It is written once per interpreter version into the cache directory as jsonl shards, so it is read
by the same streaming readers as any user source (`path: "embedded:code"`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import sys
import sysconfig

NAMES = ("code", "prose")
SHARD_CHARS = 8_000_000  # documents per shard file up to about this many characters
VERSION = 2  # part of the cache key: bump when what is written changes


def default_cache_dir() -> str:
  return os.environ.get("LLAMA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llama_jax")


def _stdlib_files(root: str) -> list[str]:
  out = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__"))
    out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
  return out


def _docstrings(source: str, module: str) -> str:
  """A module's docstrings as one document: the module's, then each class's and function's."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return ""
  parts = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc:
        title = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
        parts.append(f"{title}\n\n{doc}")
  return "\n\n".join(parts)


class _ShardWriter:
  def __init__(self, directory: str, name: str):
    self.directory, self.name, self.index, self.chars, self.f = directory, name, 0, 0, None

  def write(self, record: dict) -> None:
    if self.f is None or self.chars >= SHARD_CHARS:
      self.close()
      self.f = open(os.path.join(self.directory, f"{self.name}-{self.index:05d}.jsonl"), "w")
      self.index, self.chars = self.index + 1, 0
    self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
    self.chars += len(record["text"])

  def close(self) -> None:
    if self.f is not None:
      self.f.close()
      self.f = None


def build(directory: str) -> None:
  """Writes code-*.jsonl and prose-*.jsonl under `directory` (which must be new). The documents are
  shuffled (fixed seed) as pretraining shards are, so a shard is not one package after another."""
  import pydoc_data.topics
  root = sysconfig.get_paths()["stdlib"]
  code, prose = [], []
  for topic, text in sorted(pydoc_data.topics.topics.items()):
    prose.append({"text": text, "source": f"pydoc_data.topics:{topic}"})
  for path in _stdlib_files(root):
    try:
      with open(path, encoding="utf-8") as f:
        source = f.read()
    except (UnicodeDecodeError, OSError):
      continue  # a few test files are deliberately in other encodings
    rel = os.path.relpath(path, root)
    code.append({"text": source, "source": rel})
    module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
    if not module.startswith(("test.", "idlelib.idle_test.", "lib2to3.tests.")):
      doc = _docstrings(source, module)
      if doc:
        prose.append({"text": doc, "source": rel})
  for name, records in (("code", code), ("prose", prose)):
    random.Random(0).shuffle(records)
    writer = _ShardWriter(directory, name)
    for r in records:
      writer.write(r)
    writer.close()


def ensure(cache_dir: str = "") -> dict[str, str]:
  """Builds the corpus on first use (atomically: concurrent processes may race) and returns the
  glob of each source."""
  cache_dir = os.path.expanduser(cache_dir or default_cache_dir())
  key = hashlib.sha256(f"{VERSION}|{sys.version}|{sysconfig.get_paths()['stdlib']}".encode()).hexdigest()[:12]
  directory = os.path.join(cache_dir, f"corpus-py{sys.version_info[0]}{sys.version_info[1]}-{key}")
  if not os.path.isdir(directory):
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{directory}.tmp{os.getpid()}"
    os.makedirs(tmp)
    build(tmp)
    try:
      os.rename(tmp, directory)
    except OSError:  # another process finished first
      import shutil
      shutil.rmtree(tmp, ignore_errors=True)
  return {name: os.path.join(directory, f"{name}-*.jsonl") for name in NAMES}
