"""Supervised chat fine-tuning data, Vicuna style: conversation records -> documents of token ids
with a loss mask that counts only the assistant's answers.

Vicuna (Chiang et al. 2023, "Vicuna: An Open-Source Chatbot Impressing GPT-4 with 90% ChatGPT
Quality") fine-tunes LLaMA on ShareGPT conversations with FastChat's `fastchat/train/train.py`:
each conversation is rendered with the `vicuna_v1.1` template and everything but the assistant's
answers (and the `</s>` ending each) is masked out of the loss. Here the template is the source's
`template` from `llama_jax.tokenizer.chat` (the same object `generate.py --chat` prompts with; "auto":
the model's own Jinja template when its tokenizer has one, else vicuna_v1.1), and its `encode` gives
the ids and the answer mask.

Records are ShareGPT or Alpaca conversations (`llama_jax.data.conversations` reads and checks
them). A bad record is skipped and counted with its file and line (or a DataError under
`data.on_bad_record = "error"`).

Length. A window holds seq_len + 1 tokens (inputs and shifted targets). FastChat truncates a
conversation at the model's length; here, as the issue asks, a longer conversation is split at
turn boundaries: (user, assistant) pairs are taken greedily while the rendered piece fits, and each
later piece is rendered as a conversation of its own — the system line again, then the remaining
turns from a user turn — so every piece is a valid conversation. A single pair that does not fit
even alone is truncated to the window (counted, and logged with its file and line); a truncated
piece with no answer token left is dropped. Pieces are packed whole (several per window, never cut
across windows); use `data.document_attention` so they do not attend to each other.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

from llama_jax.data.conversations import parse_conversation
from llama_jax.data.records import CONVERSATION_FORMATS, MAX_WARNINGS
from llama_jax.data.sources import SourceStream
from llama_jax.tokenizer import chat

FORMATS = CONVERSATION_FORMATS

log = logging.getLogger("llama_jax.data")


# --- records -> messages

# --- messages -> pieces that fit a window

@dataclasses.dataclass
class Piece:
  ids: np.ndarray  # int32 (n,): BOS, the rendered turns, the EOS ending each answer
  answer: np.ndarray  # bool (n,): the tokens the loss counts
  turns: tuple[int, int]  # [first, end) of the conversation's (user, assistant) pairs in the piece
  truncated: bool  # one pair that did not fit alone, cut at max_len


def split_conversation(template: chat.ChatTemplate | chat.JinjaTemplate, messages: Sequence[dict], tokenizer,
                       max_len: int) -> list[Piece]:
  """The conversation as pieces of at most `max_len` tokens, split between (user, assistant)
  pairs: each piece takes as many following pairs as fit; each has the system line."""
  messages = list(messages)
  system = messages[:1] if messages[0]["role"] == "system" else []
  turns = messages[len(system):]
  pairs = len(turns) // 2

  def encode(first: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = template.encode(system + turns[2 * first:2 * end], tokenizer)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)

  ids, mask = encode(0, pairs)
  if len(ids) <= max_len:  # the common case: one encoding
    return [Piece(ids, mask, (0, pairs), False)]
  pieces, first = [], 0
  while first < pairs:
    ids, mask = encode(first, first + 1)
    if len(ids) > max_len:
      pieces.append(Piece(ids[:max_len], mask[:max_len], (first, first + 1), True))
      first += 1
      continue
    end = first + 1
    while end < pairs:  # a longer text never has fewer tokens, so the first misfit ends the piece
      more = encode(first, end + 1)
      if len(more[0]) > max_len:
        break
      (ids, mask), end = more, end + 1
    pieces.append(Piece(ids, mask, (first, end), False))
    first = end
  return pieces


# --- the stream of a conversation source

@dataclasses.dataclass
class Conversation:
  pieces: list[Piece]  # those with an answer token
  chars: int

  def __len__(self):  # characters, for the reader's chunk size
    return self.chars


class ConversationStream(SourceStream):
  """A SourceStream whose documents are conversation pieces (BOS ... EOS) with an answer mask.

  The reader splits each conversation as it parses it (so a record whose pieces all lost their
  answers counts as no document, and a source left with none ends instead of looping), and counts
  the truncated turns in the stream position (so the count resumes with a checkpoint)."""

  def __init__(self, *args, template: str | chat.ChatTemplate | chat.JinjaTemplate, max_len: int, **kwargs):
    self.template = chat.get_template(template) if isinstance(template, str) else template
    self.max_len = max_len
    self.chunk_mask: np.ndarray | None = None
    self._truncated = 0  # truncated turns in the chunk being read
    super().__init__(*args, **kwargs)

  @staticmethod
  def start_position() -> dict[str, int]:
    return dict(SourceStream.start_position(), truncated=0)

  def parse_record(self, fmt: str, raw: Any, path: str, record: int) -> Conversation | None:
    messages = parse_conversation(self.record_format, raw)
    if messages is None:
      return None
    kept = []
    for piece in split_conversation(self.template, messages, self.tokenizer, self.max_len):
      if piece.truncated:
        self._truncated += 1
        count = self.chunk_pos.get("truncated", 0) + self._truncated
        if count <= MAX_WARNINGS:
          self._warn_truncated(f"{path}:{record + 1}", piece, count)
      if piece.answer.any():
        kept.append(piece)
    return Conversation(kept, sum(len(m["content"]) for m in messages)) if kept else None

  def record_chars(self, doc: Conversation) -> int:
    return len(doc)

  def last_mask(self) -> np.ndarray:
    _, starts, ends = self.chunk
    return self.chunk_mask[starts[self.consumed - 1]:ends[self.consumed - 1]]

  def _load_chunk(self) -> None:
    self._truncated = 0
    conversations, self.next_pos = self.read_texts(self.chunk_pos, self.chunk_read_with)
    self.next_pos["truncated"] = self.chunk_pos.get("truncated", 0) + self._truncated
    pieces = [p for c in conversations for p in c.pieces]
    lengths = np.fromiter((len(p.ids) for p in pieces), np.int64, count=len(pieces))
    ends = np.cumsum(lengths)
    self.chunk = (np.concatenate([p.ids for p in pieces]) if pieces else np.zeros(0, np.int32),
                  ends - lengths, ends)
    self.chunk_mask = np.concatenate([p.answer for p in pieces]) if pieces else np.zeros(0, bool)

  def _warn_truncated(self, where: str, piece: Piece, count: int) -> None:
    left = "" if piece.answer.any() else "; no answer token was left, so it is dropped"
    msg = (f"truncated turn {piece.turns[0] + 1} (a user message and its answer) of the conversation "
           f"at {where} to {self.max_len} tokens (seq_len + 1){left} (source {self.name})")
    if count == MAX_WARNINGS:
      msg += "; further truncated turns of this source are counted, not logged"
    log.warning(msg)
    self.events.append(msg)
