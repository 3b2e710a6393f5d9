"""Stop strings in an answer that grows as it streams: each new character is looked at once.

The scheduler must (a) end an answer where the earliest of its stop strings begins, and (b) hold
back any tail of the text that could still become one. Searching the text again at every token
(str.find from the last character sent) and trying every prefix of every stop string against the
tail cost O(text × stop) on the one thread all requests share; a client could stall the server with
a long, periodic stop string. A Knuth-Morris-Pratt automaton per stop string keeps, for each, the
longest prefix of it that the text ends in, updated in amortised O(1) a character.
"""

from __future__ import annotations

from typing import Sequence


class StopScanner:
  """Finds the earliest of `stops` in a text that only grows.

  `feed(text)` reads what was added since the last call and returns where the earliest stop string
  found begins, or None; once one is found it stays found. `held` is how many characters at the
  text's end are the beginning of some stop string (so must not be sent yet)."""

  def __init__(self, stops: Sequence[str]):
    if any(not s for s in stops):
      raise ValueError("stop strings must not be empty")
    self.stops = tuple(stops)
    # The failure function of each stop string (fallback[k][i]: the longest proper border of
    # stop[:i + 1]), built only as far as the text has matched: a stop string of megabytes that
    # the answer never gets into costs nothing.
    self._fallback: list[list[int]] = [[0] for _ in self.stops]
    self._matched = [0] * len(self.stops)
    self._scanned = 0
    self.found: int | None = None

  @property
  def held(self) -> int:
    return 0 if self.found is not None else max(self._matched, default=0)

  def feed(self, text: str) -> int | None:
    if self.found is not None or len(text) == self._scanned:
      return self.found
    new, base = text[self._scanned:], self._scanned
    for k, stop in enumerate(self.stops):
      fallback, m = self._fallback[k], self._matched[k]
      for j, c in enumerate(new):
        while m and stop[m] != c:
          m = fallback[m - 1]
        if stop[m] == c:
          m += 1
          if m == len(stop):
            start = base + j + 1 - m
            self.found = start if self.found is None else min(self.found, start)
            break
          _extend(stop, fallback, m)
      self._matched[k] = m
    self._scanned = len(text)
    return self.found


def _extend(stop: str, fallback: list[int], m: int) -> None:
  """Makes fallback[:m] complete (the standard prefix-function recurrence, one entry at a time)."""
  while len(fallback) < m:
    i, b = len(fallback), fallback[-1]
    while b and stop[i] != stop[b]:
      b = fallback[b - 1]
    fallback.append(b + 1 if stop[i] == stop[b] else 0)
