"""Byte-level BPE's alphabet (GPT-2's `bytes_to_unicode`; Llama 3's, SmolLM's): each byte of a piece
is written as one printable character, the printable Latin-1 bytes as themselves, the others as
U+0100 on, in byte order."""

from __future__ import annotations


def _byte_chars() -> tuple[str, ...]:
  printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
  others = iter(range(256, 512))
  return tuple(chr(b) if b in printable else chr(next(others)) for b in range(256))


BYTE_TO_CHAR = _byte_chars()  # byte value -> its character
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
