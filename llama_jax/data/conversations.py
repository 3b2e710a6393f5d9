"""Conversation records -> messages: the ShareGPT and Alpaca layouts, checked.

Record formats (one JSON object per line of a .jsonl / .jsonl.gz / .jsonl.zst file):
  sharegpt: {"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}, as
            FastChat's ShareGPT/Vicuna data; "user"/"assistant" are accepted as roles, "role" /
            "content" as keys, and "messages" as the list's name (the OpenAI chat layout).
  alpaca:   {"instruction": str, "input": str (optional), "output": str}, Stanford Alpaca's data.
            The user turn is the instruction, followed by "\\n\\n" and the input when the input is
            not blank; the output is the answer.

A record is bad (BadRecord, with the reason) when it is not JSON, has no conversation list, a turn
has an unknown role, an empty text or a system message after the first, the first turn after the
system is the assistant's, or the user and the assistant do not alternate. A trailing user turn
with no answer is dropped (nothing to learn from it); a record left with no answer is bad.
"""

from __future__ import annotations

from typing import Sequence

from llama_jax.data.records import CONVERSATION_FORMATS, BadRecord, parse_json_line
from llama_jax.tokenizer import chat

FORMATS = CONVERSATION_FORMATS
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}


def parse_conversation(fmt: str, raw: bytes | str) -> list[dict] | None:
  """The messages ({"role", "content"}) of one raw jsonl line; None for a blank line; raises BadRecord."""
  obj = parse_json_line(raw)
  if obj is None:
    return None
  if not isinstance(obj, dict):
    raise BadRecord(f"a {fmt} record must be a JSON object, got {type(obj).__name__}")
  messages = _sharegpt(obj) if fmt == "sharegpt" else _alpaca(obj)
  return _check(messages)


def parse_turns(turns, key: str, answered: bool = True) -> list[dict]:
  """Checked messages of one list of turns in the sharegpt layout (the list under `key` of a record:
  preference records have several). `answered`: it must end with an answer (a trailing user turn
  is dropped); otherwise it is a prompt and must end with the user's turn."""
  if not answered:
    messages = _turns(turns, key)
    if messages[-1]["role"] != "user":
      raise BadRecord(f"{key}: a prompt must end with a user turn")
    return _check(messages + [{"role": "assistant", "content": "-", "where": key}])[:-1]
  return _check(_turns(turns, key))


def _sharegpt(obj: dict) -> list[dict]:
  key = "messages" if "messages" in obj and "conversations" not in obj else "conversations"
  return _turns(obj.get(key), key)


def _turns(turns, key: str) -> list[dict]:
  if not isinstance(turns, list) or not turns:
    raise BadRecord(f"no {key!r} list")
  messages = []
  for k, turn in enumerate(turns):
    if not isinstance(turn, dict):
      raise BadRecord(f"{key}[{k}] is not an object")
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if role not in ROLES:
      raise BadRecord(f"{key}[{k}]: unknown role {role!r} (known: {', '.join(ROLES)})")
    if not isinstance(text, str):
      raise BadRecord(f"{key}[{k}]: the text ('value') is {type(text).__name__}, not a string")
    messages.append({"role": ROLES[role], "content": text, "where": f"{key}[{k}]"})
  return messages


def _alpaca(obj: dict) -> list[dict]:
  fields = {}
  for name, required in (("instruction", True), ("input", False), ("output", True)):
    value = obj.get(name)
    if value is None and not required:
      value = ""
    if not isinstance(value, str):
      raise BadRecord(f"{name!r} is {type(value).__name__}, not a string")
    fields[name] = value
  user = fields["instruction"]
  if fields["input"].strip():
    user = f"{user}\n\n{fields['input']}"
  return [{"role": "user", "content": user, "where": "instruction"},
          {"role": "assistant", "content": fields["output"], "where": "output"}]


def _check(messages: list[dict]) -> list[dict]:
  """Validated messages, the trailing unanswered user turn dropped, the "where" keys removed."""
  for m in messages:
    if m["role"] != "system" and not m["content"].strip():
      raise BadRecord(f"{m['where']}: empty turn")
  system = messages[:1] if messages[0]["role"] == "system" else []
  turns = messages[len(system):]
  for k, m in enumerate(turns):
    expected = "user" if k % 2 == 0 else "assistant"
    if m["role"] == expected:
      continue
    if m["role"] == "system":
      raise BadRecord(f"{m['where']}: a system message after the first turn")
    if k == 0:
      raise BadRecord(f"{m['where']}: the conversation starts with the assistant")
    raise BadRecord(f"{m['where']}: two {m['role']} turns in a row (user and assistant must alternate)")
  if turns and turns[-1]["role"] == "user":
    turns = turns[:-1]
  if not turns:
    raise BadRecord("no assistant answer")
  return [{"role": m["role"], "content": m["content"]} for m in system + turns]


def plain_text(messages: Sequence[dict]) -> str:
  """A conversation as text to train a tokenizer on: the default template's rendering, without
  the end-of-answer markers (those are the EOS id, not text)."""
  template = chat.get_template()
  return template.render(messages).replace(template.stop_token, "\n")
