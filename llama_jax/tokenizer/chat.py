"""Conversation templates: how a multi-turn chat becomes one prompt, and which of its text is answer.

Two kinds with one interface (`render`, `render_prompt`, `encode`, `encode_prompt`, `with_system`,
`stop_ids`, `name`, `roles`), which SFT (`data.sft`), `generate.py --chat` and the server use:
  ChatTemplate   the built-ins, laid out in Python: `vicuna_v1.1` (FastChat's `fastchat/conversation.py`,
                 separator style ADD_COLON_TWO), `llama-2` (Meta's `llama/generation.py`
                 `chat_completion`: [INST] ... [/INST], the system prompt inside <<SYS>> ... <</SYS>> of
                 the first user turn), `chatml` (OpenAI's ChatML: <|im_start|>role\n ... <|im_end|>),
                 `raw` (the user text, then the answer).
  JinjaTemplate  a model's own `chat_template` (tokenizer_config.json or chat_template.jinja),
                 rendered as transformers' `apply_chat_template` renders it.
`template_for(tokenizer, name)` picks one: the model's own when it has one and no name is given
("auto"), else the named built-in (default vicuna_v1.1).

Built-ins: special tokens in the rendered text. The text is what FastChat's `get_prompt` prints: an
answer ends with the literal string `stop_token` ("</s>"; ChatML's "<|im_end|>"), which stands for
the tokenizer's token of that spelling if it has one, else its EOS id; `start_token` ("<s>",
Llama-2 only, before every turn after the first) stands for the BOS id. The leading BOS of a
sequence is not part of the text: the encoder prepends it when the tokenizer adds one to any
prompt. A SentencePiece tokenizer would spell "</s>" as four characters, so encode with
`encode_text` / `encode` here (they split on the markers and emit the ids).

Messages are dicts {"role": "system" | "user" | "assistant", "content": str}; an optional system
message comes first (it replaces the template's default system line), then user and assistant turns
alternate, starting with the user.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import re
from typing import Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox

STYLES = ("add_colon_two", "llama2", "chatml", "raw")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  name: str
  style: str  # how turns are laid out: one of STYLES
  system: str = ""  # default system line; a leading {"role": "system"} message overrides it
  roles: tuple[str, str] = ("USER", "ASSISTANT")
  sep: str = " "  # after the system line and after each user turn (add_colon_two)
  stop_token: str = "</s>"  # ends each answer: the tokenizer's token of this spelling, else EOS
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
    assistant's tag ("... ASSISTANT:" for Vicuna, "... [/INST]" for Llama-2,
    "<|im_start|>assistant\\n" for ChatML). The last message must be the user's."""
    return "".join(text for text, _ in self._pieces(messages, generation_prompt=True))

  def stop_ids(self, tokenizer) -> tuple[int, ...]:
    """The ids that end an answer: the tokenizer's EOS ids and the stop token's."""
    return tuple(dict.fromkeys(list(tokenizer.eos_ids) + [self._stop_id(tokenizer)]))

  def _stop_id(self, tokenizer) -> int:
    own = tokenizer.token_to_id(self.stop_token)
    return own if own is not None else tokenizer.eos_id

  def _pieces(self, messages, generation_prompt):
    system, turns = _split_messages(messages, self.system)
    if generation_prompt and (not turns or turns[-1]["role"] != "user"):
      raise ValueError("a generation prompt needs the conversation to end with a user message")
    layout = {"add_colon_two": self._add_colon_two, "llama2": self._llama2, "chatml": self._chatml,
              "raw": self._raw}
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

  def _chatml(self, system, turns, generation_prompt):
    # "<|im_start|>{role}\n{content}<|im_end|>\n" per message (the system one only when there is a
    # system line); the generation prompt is "<|im_start|>assistant\n". The answer is the content
    # and its <|im_end|>; the newline after it belongs to the next turn.
    pieces = [(f"<|im_start|>system\n{system}{self.stop_token}\n", False)] if system else []
    for turn in turns:
      if turn["role"] == "user":
        pieces.append((f"<|im_start|>user\n{turn['content']}{self.stop_token}\n", False))
      else:
        pieces.append(("<|im_start|>assistant\n", False))
        pieces.append((turn["content"] + self.stop_token, True))
        pieces.append(("\n", False))
    if generation_prompt:
      pieces.append(("<|im_start|>assistant\n", False))
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
    """Token ids of rendered text: the markers become their ids, the rest the tokenizer's."""
    ids, _ = self._encode_pieces([(text, False)], tokenizer, bos)
    return ids

  def encode_prompt(self, messages: Sequence[dict], tokenizer) -> list[int]:
    """BOS (when the tokenizer adds one) + the generation prompt, as ids."""
    return self.encode_text(self.render_prompt(messages), tokenizer)

  def encode(self, messages: Sequence[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """(ids, is_answer) of the whole conversation, BOS first: the SFT input and its loss mask.

    The text between markers is tokenised in one go (not piece by piece: SentencePiece would add
    a word-start "▁" at every piece boundary and the tokens would differ from the whole text's);
    a token is answer when any of its characters is, e.g. "▁Hello" after "ASSISTANT:". A token of
    spaces only right before an answer counts too: the generation prompt ends at the assistant's
    tag ("ASSISTANT:"), so the space after it is the model's to produce, and when the tokenizer
    gives that space a token of its own ("▁" before a rare first character) the first token the
    model must generate would otherwise never be trained."""
    ids, mask = self._encode_pieces(self.segments(messages), tokenizer, bos=True)
    for i in range(len(ids) - 1):
      if mask[i + 1] and not mask[i] and _is_spaces(tokenizer.id_to_piece(ids[i])):
        mask[i] = True
    return ids, mask

  def _encode_pieces(self, pieces, tokenizer, bos):
    text = "".join(t for t, _ in pieces)
    answer = bytearray(len(text))  # per character of the text: 1 where answer
    pos = 0
    for t, is_answer in pieces:
      if is_answer:
        answer[pos:pos + len(t)] = b"\x01" * len(t)
      pos += len(t)
    markers = {self.stop_token: self._stop_id(tokenizer)}
    if self.start_token and tokenizer.bos_id is not None:
      markers[self.start_token] = tokenizer.bos_id
    pattern = "(" + "|".join(re.escape(m) for m in markers if m) + ")"
    ids, mask = ([tokenizer.bos_id], [False]) if bos and tokenizer.add_bos else ([], [])
    offset = 0  # character offset of the current part in the text
    for part in re.split(pattern, text):
      if part in markers:
        ids.append(markers[part])
        mask.append(bool(answer[offset]))
      elif part:
        for piece_id, begin, end in tokenizer.encode_with_offsets(part):
          ids.append(piece_id)
          mask.append(any(answer[offset + begin:offset + max(end, begin + 1)]))
      offset += len(part)
    return ids, mask


def _is_spaces(piece: str) -> bool:
  """A token of spaces only: "▁" is SentencePiece's space, "Ġ" byte-level BPE's."""
  return bool(piece) and not piece.replace("\u2581", " ").replace("\u0120", " ").strip(" ")


class _Generation(jinja2.ext.Extension):
  """`{% generation %} ... {% endgeneration %}` (transformers' AssistantTracker tag): rendered as
  its body. Answers are found from the rendered turns instead (JinjaTemplate.encode)."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


class _Namespace(jinja2.utils.Namespace):
  """transformers' TemplateNamespace: no underscore attributes (no reaching CPython internals)."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # transformers' tojson: no HTML escaping (Jinja's own escapes <, >, &), and its options exposed.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
  """The environment of transformers' `_compile_jinja_template`: sandboxed, immutable, trim_blocks
  and lstrip_blocks, loop controls, and its globals and filters."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  env.globals["namespace"] = _Namespace
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateError as e:
    raise ValueError(f"chat template: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
  where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
  return (str(e).strip().splitlines() or [type(e).__name__])[0] + where


@dataclasses.dataclass(frozen=True)
class JinjaTemplate:
  """A model's own Jinja chat template, rendered as transformers' `apply_chat_template` renders it
  (its `render_jinja_template`): the messages, `add_generation_prompt`, and the tokenizer's named
  special tokens (`bos_token`, `eos_token`, ...) as variables; ids are the rendered text's, with no
  BOS added (the template writes it), as `apply_chat_template(tokenize=True)` gives them.

  Which tokens are answer (for SFT): the text each assistant message adds. For the i-th message,
  an assistant's, the conversation up to it is rendered with the generation prompt (messages[:i],
  add_generation_prompt=True, what generation would be prompted with) and up to and including it
  (messages[:i + 1]); the answer is the text between the two, without the trailing whitespace (the
  newline after an end marker belongs to the next turn). So it holds the assistant's content and
  the end marker the template writes after it (<|im_end|>, <|eot_id|>, </s>), which the model must
  learn to produce. Each render must be a prefix of the next and of the whole conversation's, as
  it is for templates that lay out turns one after another; a template that rewrites earlier turns
  is refused (ValueError) rather than masked wrongly."""
  source: str
  special_tokens: dict = dataclasses.field(default_factory=dict)  # {"bos_token": "<s>", ...}
  name: str = "auto"
  system: str | None = None  # a system message put first when the conversation has none
  roles: tuple[str, str] = ("user", "assistant")

  def __post_init__(self):
    _compile(self.source)  # a template that does not compile is refused here, in one line

  def with_system(self, system: str | None) -> "JinjaTemplate":
    return self if system is None else dataclasses.replace(self, system=system)

  def _messages(self, messages: Sequence[dict]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise ValueError(f"message {i}: needs a string 'role' and a string 'content'")
      out.append({k: v for k, v in m.items() if v is not None})
    if self.system is not None and not (out and out[0]["role"] == "system"):
      out.insert(0, {"role": "system", "content": self.system})
    return out

  def _render(self, messages: list[dict], generation_prompt: bool) -> str:
    try:
      return _compile(self.source).render(messages=messages, tools=None, documents=None,
                                          add_generation_prompt=generation_prompt, **self.special_tokens)
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f"chat template: {_one_line(e)}") from None

  def render(self, messages: Sequence[dict]) -> str:
    return self._render(self._messages(messages), False)

  def render_prompt(self, messages: Sequence[dict]) -> str:
    messages = self._messages(messages)
    if not messages or messages[-1]["role"] != "user":
      raise ValueError("a generation prompt needs the conversation to end with a user message")
    return self._render(messages, True)

  def stop_ids(self, tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer.eos_ids)

  def answer_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the whole conversation's text, [begin, end) character spans of its answers)."""
    messages = self._messages(messages)
    text = self._render(messages, False)
    spans = []
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      prompt = self._render(messages[:i], True)
      upto = self._render(messages[:i + 1], False)
      if not (upto.startswith(prompt) and text.startswith(upto)):
        raise ValueError(f"chat template {self.name!r}: the conversation up to message {i} does not "
                         "render as a prefix of the whole, so its answers cannot be located")
      end = len(upto.rstrip())
      if end > len(prompt):
        spans.append((len(prompt), end))
    return text, spans

  def encode(self, messages: Sequence[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """(ids, is_answer): a token is answer when any of its characters lies in an answer span."""
    text, spans = self.answer_spans(messages)
    answer = bytearray(len(text))
    for begin, end in spans:
      answer[begin:end] = b"\x01" * (end - begin)
    tokens = tokenizer.encode_with_offsets(text)
    return [i for i, _, _ in tokens], [any(answer[b:max(e, b + 1)]) for _, b, e in tokens]

  def encode_prompt(self, messages: Sequence[dict], tokenizer) -> list[int]:
    return [i for i, _, _ in tokenizer.encode_with_offsets(self.render_prompt(messages))]


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
    "chatml": ChatTemplate("chatml", "chatml", system="", roles=("user", "assistant"),
                           stop_token="<|im_end|>", start_token=""),
    "raw": ChatTemplate("raw", "raw", system=""),
}
DEFAULT_TEMPLATE = "vicuna_v1.1"
AUTO = "auto"  # the model's own template, else DEFAULT_TEMPLATE
NAMES = (AUTO,) + tuple(TEMPLATES)


def get_template(name: str = DEFAULT_TEMPLATE) -> ChatTemplate:
  if name not in TEMPLATES:
    raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
  return TEMPLATES[name]


def template_for(tokenizer, name: str | None = None) -> ChatTemplate | JinjaTemplate:
  """The template to chat with or fine-tune on: the named built-in, or with no name (or "auto")
  the tokenizer's own Jinja template when its folder has one, else vicuna_v1.1."""
  if name not in (None, AUTO):
    return get_template(name)
  if tokenizer is not None and tokenizer.chat_template:
    return JinjaTemplate(tokenizer.chat_template, dict(tokenizer.special_tokens_map))
  return get_template(DEFAULT_TEMPLATE)
