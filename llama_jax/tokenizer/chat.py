"""Conversation templates: how a multi-turn chat becomes one prompt, and which of its text is answer.

The Vicuna v1.1 template is FastChat's `vicuna_v1.1` (`fastchat/conversation.py`, separator style
ADD_COLON_TWO); the Llama-2 chat template is Meta's `llama/generation.py` `chat_completion`
([INST] ... [/INST], the system prompt inside <<SYS>> ... <</SYS>> of the first user turn).

Special tokens in the rendered text. The text is what FastChat's `get_prompt` prints: an answer
ends with the literal string `stop_token` ("</s>"), which stands for the tokenizer's EOS id, and
`start_token` ("<s>", Llama-2 only, before every turn after the first) stands for the BOS id. The
leading BOS of a sequence is not part of the text: the encoder prepends it, as it does for any
prompt. A SentencePiece tokenizer would spell "</s>" as four characters, so encode with
`encode_text` / `encode` here (they split on the markers and emit the ids), never `sp.encode`.

Messages are dicts {"role": "system" | "user" | "assistant", "content": str}; an optional system
message comes first (it replaces the template's default system line), then user and assistant turns
alternate, starting with the user.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

STYLES = ("add_colon_two", "llama2", "raw")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  name: str
  style: str  # how turns are laid out: one of STYLES
  system: str = ""  # default system line; a leading {"role": "system"} message overrides it
  roles: tuple[str, str] = ("USER", "ASSISTANT")
  sep: str = " "  # after the system line and after each user turn (add_colon_two)
  stop_token: str = "</s>"  # ends each answer; means the EOS id, not these characters
  start_token: str = "<s>"  # starts each Llama-2 turn after the first; means the BOS id

  def __post_init__(self):
    if self.style not in STYLES:
      raise ValueError(f"chat template {self.name!r}: style must be one of {STYLES}, got {self.style!r}")

  def with_system(self, system: str | None) -> "ChatTemplate":
    return self if system is None else dataclasses.replace(self, system=system)

  def segments(self, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces whose concatenation is the whole conversation's text. An answer
    piece is exactly the assistant's content and its end marker (stop_token); everything else —
    system line, role tags, user turns, separators — is prompt, to be masked out of an SFT loss."""
    return self._pieces(messages, generation_prompt=False)

  def render(self, messages: Sequence[dict]) -> str:
    """The whole conversation as training text (answers included)."""
    return "".join(text for text, _ in self.segments(messages))

  def render_prompt(self, messages: Sequence[dict]) -> str:
    """The text to generate the next answer from: the conversation so far, ending with the
    assistant's tag ("... ASSISTANT:" for Vicuna, "... [/INST]" for Llama-2). The last message
    must be the user's."""
    return "".join(text for text, _ in self._pieces(messages, generation_prompt=True))

  def _pieces(self, messages, generation_prompt):
    system, turns = _split_messages(messages, self.system)
    if generation_prompt and (not turns or turns[-1]["role"] != "user"):
      raise ValueError("a generation prompt needs the conversation to end with a user message")
    layout = {"add_colon_two": self._add_colon_two, "llama2": self._llama2, "raw": self._raw}
    pieces = layout[self.style](system, turns, generation_prompt)
    return [(text, is_answer) for text, is_answer in pieces if text]

  def _add_colon_two(self, system, turns, generation_prompt):
    # FastChat ADD_COLON_TWO: system + sep, then "ROLE: message" + (sep after user, sep2 after the
    # assistant), and a bare "ASSISTANT:" to prompt the next answer.
    user, assistant = self.roles
    pieces = [(system + self.sep, False)]
    for turn in turns:
      if turn["role"] == "user":
        pieces.append((f"{user}: {turn['content']}{self.sep}", False))
      else:
        pieces.append((f"{assistant}: ", False))
        pieces.append((turn["content"] + self.stop_token, True))
    if generation_prompt:
      pieces.append((f"{assistant}:", False))
    return pieces

  def _llama2(self, system, turns, generation_prompt):
    # Meta's chat_completion: each (user, answer) pair is BOS "[INST] u [/INST] a " EOS; the system
    # prompt is folded into the first user message; contents are stripped.
    pieces = []
    for i, turn in enumerate(turns):
      content = turn["content"]
      if turn["role"] == "user":
        if i == 0 and system:
          content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        start = self.start_token if i else ""
        pieces.append((f"{start}[INST] {content.strip()} [/INST]", False))
      else:
        pieces.append((" ", False))
        pieces.append((f"{content.strip()} {self.stop_token}", True))
    return pieces

  def _raw(self, system, turns, generation_prompt):
    # No roles or system line: the user text is the prompt, the answer continues it.
    pieces = [(system, False)] if system else []
    for turn in turns:
      if turn["role"] == "user":
        pieces.append((turn["content"], False))
      else:
        pieces.append((turn["content"] + self.stop_token, True))
    return pieces

  def encode_text(self, text: str, tokenizer, bos: bool = True) -> list[int]:
    """Token ids of rendered text: the markers become the EOS/BOS ids, the rest SentencePiece."""
    ids, _ = self._encode_pieces([(text, False)], tokenizer, bos)
    return ids

  def encode_prompt(self, messages: Sequence[dict], tokenizer) -> list[int]:
    """BOS + the generation prompt, as ids."""
    return self.encode_text(self.render_prompt(messages), tokenizer)

  def encode(self, messages: Sequence[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """(ids, is_answer) of the whole conversation, BOS first: the SFT input and its loss mask.

    The text between markers is tokenised in one go (not piece by piece: SentencePiece would add
    a word-start "▁" at every piece boundary and the tokens would differ from the whole text's);
    a token is answer when any of its characters is, e.g. "▁Hello" after "ASSISTANT:"."""
    return self._encode_pieces(self.segments(messages), tokenizer, bos=True)

  def _encode_pieces(self, pieces, tokenizer, bos):
    text = "".join(t for t, _ in pieces)
    answer = bytearray(len(text.encode("utf-8")))  # per byte of the text: 1 where answer
    pos = 0
    for t, is_answer in pieces:
      n = len(t.encode("utf-8"))
      if is_answer:
        answer[pos:pos + n] = b"\x01" * n
      pos += n
    markers = {self.stop_token: tokenizer.eos_id, self.start_token: tokenizer.bos_id}
    pattern = "(" + "|".join(re.escape(m) for m in markers if m) + ")"
    ids, mask = ([tokenizer.bos_id], [False]) if bos else ([], [])
    offset = 0  # byte offset of the current part in the text
    for part in re.split(pattern, text):
      size = len(part.encode("utf-8"))
      if part in markers:
        ids.append(markers[part])
        mask.append(bool(answer[offset]))
      elif part:
        for piece_id, begin, end in _pieces_with_offsets(tokenizer, part):
          ids.append(piece_id)
          span = answer[offset + begin:offset + max(end, begin + 1)]
          mask.append(any(span))
      offset += size
    return ids, mask


def _pieces_with_offsets(tokenizer, text: str) -> list[tuple[int, int, int]]:
  """(id, begin byte, end byte) of each SentencePiece piece of text."""
  sp = tokenizer.sp
  try:
    proto = sp.encode(text, out_type="proto")  # sentencepiece >= 0.2
  except (ValueError, TypeError):
    proto = sp.encode(text, out_type="immutable_proto")  # sentencepiece 0.1.99
  return [(p.id, p.begin, p.end) for p in proto.pieces]


def _split_messages(messages: Sequence[dict], default_system: str) -> tuple[str, list[dict]]:
  messages = list(messages)
  system = default_system
  if messages and messages[0].get("role") == "system":
    system = messages[0]["content"]
    messages = messages[1:]
  for i, m in enumerate(messages):
    expected = "user" if i % 2 == 0 else "assistant"
    if m.get("role") != expected:
      raise ValueError(
          f"message {i}: expected role {expected!r} (user and assistant alternate, user first), "
          f"got {m.get('role')!r}")
    if not isinstance(m.get("content"), str):
      raise ValueError(f"message {i}: content must be a string")
  return system, messages


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

TEMPLATES: dict[str, ChatTemplate] = {
    "vicuna_v1.1": ChatTemplate("vicuna_v1.1", "add_colon_two", system=VICUNA_SYSTEM),
    "llama-2": ChatTemplate("llama-2", "llama2", system=""),
    "raw": ChatTemplate("raw", "raw", system=""),
}
DEFAULT_TEMPLATE = "vicuna_v1.1"


def get_template(name: str = DEFAULT_TEMPLATE) -> ChatTemplate:
  if name not in TEMPLATES:
    raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
  return TEMPLATES[name]
