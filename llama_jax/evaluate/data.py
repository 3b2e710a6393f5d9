"""Evaluation data files and their errors.

Perplexity reads plain text: a .txt file whole, or a .jsonl file's "text" fields joined with a blank
line ("\n\n", as the transformers perplexity guide joins WikiText's lines). Multiple choice reads
.jsonl lines {"context": str, "choices": [str, ...], "label": int}.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

TEXT_JOIN = "\n\n"


class EvalDataError(ValueError):
  """Bad evaluation input; the message names the file and, where there is one, the line."""

  def __init__(self, path: str, message: str, line: int | None = None):
    where = f"{path}:{line}" if line is not None else f"{path}"
    super().__init__(f"{where}: {message}")
    self.path, self.line = path, line


@dataclasses.dataclass(frozen=True)
class Example:
  context: str
  choices: tuple[str, ...]
  label: int
  line: int  # 1-based line of the file, for error messages


def _json_lines(path: str) -> Iterator[tuple[int, dict]]:
  if not os.path.isfile(path):
    raise EvalDataError(path, "no such file")
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise EvalDataError(path, f"not UTF-8 text ({e.reason})", number) from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise EvalDataError(path, f"not valid JSON ({e.msg})", number) from None
      if not isinstance(record, dict):
        raise EvalDataError(path, "expected a JSON object", number)
      yield number, record


def read_text(path: str) -> str:
  """The text of a .txt file, or the "text" fields of a .jsonl file joined by TEXT_JOIN."""
  if path.endswith(".jsonl"):
    texts = []
    for number, record in _json_lines(path):
      if not isinstance(record.get("text"), str):
        raise EvalDataError(path, 'line has no string field "text"', number)
      texts.append(record["text"])
    text = TEXT_JOIN.join(texts)
  elif path.endswith(".txt"):
    if not os.path.isfile(path):
      raise EvalDataError(path, "no such file")
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError as e:
      raise EvalDataError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
  else:
    raise EvalDataError(path, "perplexity data must be a .txt or .jsonl file")
  if not text.strip():
    raise EvalDataError(path, "no text")
  return text


def read_choices(path: str) -> list[Example]:
  if not path.endswith(".jsonl"):
    raise EvalDataError(path, "multiple-choice data must be a .jsonl file")
  examples = []
  for number, record in _json_lines(path):
    context, choices, label = record.get("context"), record.get("choices"), record.get("label")
    if not isinstance(context, str):
      raise EvalDataError(path, 'line has no string field "context"', number)
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
      raise EvalDataError(path, 'line has no "choices" list of non-empty strings', number)
    if isinstance(label, bool) or not isinstance(label, int):
      raise EvalDataError(path, 'line has no integer "label"', number)
    if not 0 <= label < len(choices):
      raise EvalDataError(path, f"label {label} is out of range for {len(choices)} choices", number)
    examples.append(Example(context, tuple(choices), label, number))
  if not examples:
    raise EvalDataError(path, "no examples")
  return examples
