"""A plain-text table of results, one row per model, for choosing between models."""

from __future__ import annotations

from typing import Any, Sequence


def _cell(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  cells = [list(columns)] + [[_cell(row[c]) for c in columns] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  # Text columns (the model path) align left, numbers right.
  lines = []
  for r in cells:
    parts = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
    lines.append("  ".join(parts).rstrip())
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
