"""Token chunks in, printable text out, decoding a short window per chunk (not the whole answer).

A tokenizer decodes sequences, not tokens: SentencePiece turns a leading "▁" into a space only
mid-text, and byte-level pieces combine into characters. So the new text of a chunk is
decode(window + chunk) minus decode(window), where the window starts a few tokens back at a point
already written (vLLM's incremental detokenizer, prefix and read offsets); the first window is the
prompt's last tokens (from a character's start), so the answer's first word keeps its leading
space. Text ending in an unfinished UTF-8 character (U+FFFD) waits for the next chunk. Each call
decodes a bounded number of tokens, so streaming n tokens costs O(n), not O(n²).

New tokens may change how the window's written part decodes (a prompt of token ids that ends
mid-character, its last bytes completed by the answer's first): decode(window) then no longer
starts with what was written, and the window starts over at the written point, as
`decode_continuation` decodes the new tokens alone when the prompt's text is no prefix of the whole.
"""

from __future__ import annotations

from typing import Callable, Sequence

PROMPT_CONTEXT = 5  # prompt tokens decoded before the answer, for its leading space


class TextStreamer:

  def __init__(self, tokenizer, write: Callable[[str], None], eos_ids: Sequence[int] = (),
               prompt_ids: Sequence[int] = ()):
    self.tokenizer, self.write = tokenizer, write
    self.eos_ids = set(int(i) for i in eos_ids)
    self.ids = [int(i) for i in prompt_ids][-PROMPT_CONTEXT:]
    self.prefix = 0  # the window being decoded starts here
    self.read = len(self.ids)  # text up to here has been written
    self.text = ""  # everything written so far
    self._started = False

  def _start(self) -> None:
    """A window that starts inside a character (its first bytes cut off) decodes as U+FFFD there,
    and a byte-fallback decoder (Llama 2's tokenizer.json) turns the whole run of byte pieces that
    holds the cut into U+FFFD, the answer's first bytes with it: the window starts past the cut.
    (At the first call, not in __init__: a prompt the tokenizer cannot decode fails where the
    answer's tokens would.)"""
    self._started = True
    while self.read and self.tokenizer.decode(self.ids[:self.read]).startswith("\ufffd"):
      self.ids.pop(0)
      self.read -= 1

  def __call__(self, new_ids: Sequence[int]) -> None:
    if not self._started:
      self._start()
    self.ids += [int(i) for i in new_ids if int(i) not in self.eos_ids]
    if len(self.ids) == self.read:
      return
    new = self._new_text()
    if not new or new.endswith("\ufffd"):
      return  # nothing printable yet, or an unfinished character
    self._emit(new)
    self.prefix, self.read = self.read, len(self.ids)

  def flush(self) -> None:
    """At the end: whatever was held back (an unfinished character decodes as U+FFFD)."""
    if not self._started:
      self._start()
    new = self._new_text()
    if new:
      self._emit(new)
    self.prefix = self.read = len(self.ids)

  def _new_text(self) -> str:
    """What the tokens past `read` add to the text written."""
    before = self.tokenizer.decode(self.ids[self.prefix:self.read])
    now = self.tokenizer.decode(self.ids[self.prefix:])
    if not now.startswith(before):  # the new tokens changed the written part: start over there
      self.prefix = self.read
      before, now = "", self.tokenizer.decode(self.ids[self.read:])
    return now[len(before):]

  def _emit(self, text: str) -> None:
    self.text += text
    self.write(text)
