"""A small conversation file for the fine-tuning demo (`configs/sft_tiny.py`), made on first use:
ShareGPT-format questions about Python's built-in functions, answered with the first line of the
function's own docstring — text the tiny model pretrained on the interpreter's documentation
(`configs/tiny.py`) has seen, so a short fine-tune teaches it the chat format, not new facts.

  data.source("demo:chat", 1.0, epochs=3, format="sharegpt")

It is written once per interpreter version into the cache directory (no download), like the
embedded corpus (`corpus.py`).
"""

from __future__ import annotations

import builtins
import os
import random
import sys

from llama_jax.data import corpus
from llama_jax.data.errors import DataError
from llama_jax.data.records import write_jsonl_once

NAMES = ("chat",)
VERSION = 1  # part of the file name: bump when what is written changes

QUESTIONS = ("What does the Python built-in {name} do?", "What is {name} for in Python?",
             "Explain the built-in {name}.", "Tell me about {name}().")
FOLLOW_UPS = ("And {name}?", "What about {name}?")
GREETINGS = (("Hello!", "Hello! Ask me about a Python built-in function."),
             ("Hi, who are you?", "I am a small assistant trained on Python's documentation."))


def builtin_answers() -> dict[str, str]:
  """Built-in function or type name -> the first prose line of its docstring (where that is a
  sentence); exceptions and the interactive helpers `site` adds (help, exit, ...) are left out."""
  out = {}
  for name in sorted(dir(builtins)):
    obj = getattr(builtins, name)
    if name.startswith("_") or not callable(obj) or name in ("help", "exit", "quit", "copyright",
                                                               "credits", "license"):
      continue
    if isinstance(obj, type) and issubclass(obj, BaseException):
      continue
    lines = [x.strip() for x in (obj.__doc__ or "").splitlines() if x.strip()]
    # Skip signature lines ("iter(iterable) -> iterator"): keep the first prose line.
    lines = [x for x in lines if "->" not in x and not x.startswith(name + "(")]
    if lines and lines[0].endswith("."):
      out[name] = lines[0]
  return out


def conversations(seed: int = 0) -> list[dict]:
  """ShareGPT records: one to three questions each, some after a greeting."""
  rng = random.Random(seed)
  answers = builtin_answers()
  names = sorted(answers)
  records = []
  for _ in range(4):  # every function about four times, in varied conversations
    rng.shuffle(names)
    i = 0
    while i < len(names):
      turns = []
      if rng.random() < 0.2:
        turns += list(rng.choice(GREETINGS))
      k = rng.randint(1, 3)
      for j, name in enumerate(names[i:i + k]):
        question = rng.choice(QUESTIONS if j == 0 else FOLLOW_UPS + QUESTIONS)
        turns += [question.format(name=name), answers[name]]
      i += k
      records.append({"conversations": [{"from": "human" if n % 2 == 0 else "gpt", "value": v}
                                        for n, v in enumerate(turns)]})
  return records


def resolve(name: str, cache_dir: str = "") -> str:
  """The path of demo file `name`, written into the cache directory on first use."""
  if name not in NAMES:
    raise DataError(f"no demo source 'demo:{name}'; known: {', '.join('demo:' + n for n in NAMES)}")
  directory = os.path.join(os.path.expanduser(cache_dir or corpus.default_cache_dir()), "sft_demo")
  path = os.path.join(directory, f"{name}-py{sys.version_info[0]}{sys.version_info[1]}-v{VERSION}.jsonl")
  return write_jsonl_once(path, conversations)
