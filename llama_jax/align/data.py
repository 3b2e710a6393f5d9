"""Preference pairs and prompts: JSON-lines records -> the batches of the reward-model, DPO and PPO
recipes, through the data pipeline's own pieces (`data.sources`, the held-out split, per-process
sharding, epoch limits, the weighted mixture, bad-record counting, the read-ahead iterator and its
resumable state); only the record layout and the batches are new here.

Preference records (one JSON object per line of a .jsonl / .jsonl.gz / .jsonl.zst file):
  {"prompt": str, "chosen": str, "rejected": str}                  TRL's layout: a user turn, two answers
  {"chosen": [turns], "rejected": [turns]}                         two conversations; their longest
                                                                   shared prefix is the prompt
  {"prompt": [turns], "chosen": [turns], "rejected": [turns]}      TRL's conversational layout
Turns are ShareGPT / OpenAI messages, checked by `data.conversations`. Each side is rendered with the
source's chat template and tokenised; only the response's tokens (after the prompt) count. A record
is bad — counted and skipped with its file and line, or a DataError under
`data.on_bad_record = "error"` — when it is not JSON, lacks a field, has an empty response, the
same chosen and rejected answers, a malformed conversation, or a side longer than the window
(seq_len + 1 tokens).

Prompt records (PPO): {"prompt": str | [turns ending with the user's]} (a preference record's
prompt serves too); a prompt longer than `ppo.prompt_len` tokens is bad.

Batches, right-padded, a row per record (the last batch of a limited epoch completed with empty
rows, whose masks are 0):
  pairs    chosen, rejected: int32 (B, seq_len + 1), BOS first; chosen_mask, rejected_mask: float32,
           1 on the response's tokens
  prompts  prompt: int32 (B, ppo.prompt_len) ending with the template's generation prompt;
           prompt_mask: float32, 1 on the prompt's tokens
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import numpy as np

from llama_jax.data import pipeline
from llama_jax.data.conversations import parse_turns
from llama_jax.data.errors import DataError
from llama_jax.data.mixture import Mixture
from llama_jax.data.packing import Packer
from llama_jax.data.records import JSONL, BadRecord, parse_json_line
from llama_jax.data.sources import SourceStream
from llama_jax.tokenizer import chat

PAIR_FIELDS = ("chosen", "chosen_mask", "rejected", "rejected_mask")
# Records are rendered and encoded one at a time, so a large chunk gains nothing; a small one keeps
# the first batch quick and a small repeating source from being read over and over in one chunk.
CHUNK_CHARS = 1 << 15
PROMPT_FIELDS = ("prompt", "prompt_mask")


@dataclasses.dataclass
class Example:
  arrays: tuple[np.ndarray, ...]  # one row of each field, unpadded
  chars: int  # of the record's text, for the reader's chunk size


# --- records -> messages

def _user(text: Any, key: str) -> list[dict]:
  if not isinstance(text, str):
    raise BadRecord(f"{key!r} is {type(text).__name__}, not a string or a list of turns")
  if not text.strip():
    raise BadRecord(f"empty {key!r}")
  return [{"role": "user", "content": text}]


def _prompt(obj: dict) -> list[dict]:
  if "prompt" not in obj:
    raise BadRecord("no 'prompt' field")
  prompt = obj["prompt"]
  return parse_turns(prompt, "prompt", answered=False) if isinstance(prompt, list) else _user(prompt, "prompt")


def preference_messages(obj: Any) -> tuple[list[dict], list[dict], list[dict]]:
  """(prompt, chosen answer, rejected answer) messages of a preference record; raises BadRecord."""
  if not isinstance(obj, dict):
    raise BadRecord(f"a preference record must be a JSON object, got {type(obj).__name__}")
  for key in ("chosen", "rejected"):
    if key not in obj:
      raise BadRecord(f"no {key!r} field")
  chosen, rejected = obj["chosen"], obj["rejected"]
  if isinstance(chosen, str) and isinstance(rejected, str):
    prompt = _prompt(obj)
    for key, text in (("chosen", chosen), ("rejected", rejected)):
      if not text.strip():
        raise BadRecord(f"empty {key!r} response")
    answers = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
  elif isinstance(chosen, list) and isinstance(rejected, list):
    if "prompt" in obj:
      prompt = _prompt(obj)
      whole = [parse_turns(prompt + side, f"prompt + {key}") for key, side in
               (("chosen", chosen), ("rejected", rejected))]
    else:
      whole = [parse_turns(chosen, "chosen"), parse_turns(rejected, "rejected")]
      shared = 0
      while shared < min(map(len, whole)) and whole[0][shared] == whole[1][shared]:
        shared += 1
      prompt = whole[0][:shared]
      if not prompt or prompt[-1]["role"] != "user":
        raise BadRecord("the two conversations must share their turns up to a user turn (the prompt) "
                        "and differ in the answers after it")
    answers = tuple(w[len(prompt):] for w in whole)
    for key, answer in zip(("chosen", "rejected"), answers):
      if not answer:
        raise BadRecord(f"empty {key!r} response")
  else:
    raise BadRecord("'chosen' and 'rejected' must both be strings or both be lists of turns")
  if answers[0] == answers[1]:
    raise BadRecord("'chosen' and 'rejected' are the same")
  return prompt, answers[0], answers[1]


# --- messages -> token rows

def _common_prefix(a: np.ndarray, b: list[int]) -> int:
  n = min(len(a), len(b))
  differ = np.flatnonzero(a[:n] != np.asarray(b[:n], a.dtype))
  return int(differ[0]) if differ.size else n


def encode_response(template, tokenizer, prompt: list[dict], answer: list[dict],
                    prompt_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """(ids, response mask) of prompt + answer: the mask covers the answers' tokens (their end
  markers included) after the generation prompt, as the template's `encode` marks them (the lone
  space token a first answer word may start with included)."""
  ids, answer_mask = template.encode(prompt + answer, tokenizer)
  ids, answer_mask = np.asarray(ids, np.int32), np.asarray(answer_mask, bool)
  answer_mask[:_common_prefix(ids, prompt_ids)] = False
  return ids, answer_mask


def encode_pair(obj: Any, template, tokenizer, max_len: int) -> Example:
  prompt, chosen, rejected = preference_messages(obj)
  prompt_ids = template.encode_prompt(prompt, tokenizer)
  rows = []
  for key, answer in (("chosen", chosen), ("rejected", rejected)):
    ids, mask = encode_response(template, tokenizer, prompt, answer, prompt_ids)
    if len(ids) > max_len:
      raise BadRecord(f"the {key} side has {len(ids)} tokens, more than the window's {max_len} "
                      "(seq_len + 1)")
    if not mask.any():
      raise BadRecord(f"the {key} response has no tokens")
    rows += [ids, mask.astype(np.float32)]
  if np.array_equal(rows[0], rows[2]) and np.array_equal(rows[1], rows[3]):
    # Answers the template renders alike (one that trims them: llama-2's, `| trim`): a pair that
    # teaches nothing and adds a constant to the batch's loss.
    raise BadRecord("'chosen' and 'rejected' are the same once the template renders them")
  chars = sum(len(m["content"]) for m in prompt + chosen + rejected)
  return Example(tuple(rows), chars)


def encode_prompt(obj: Any, template, tokenizer, max_len: int) -> Example:
  if not isinstance(obj, dict):
    raise BadRecord(f"a prompt record must be a JSON object, got {type(obj).__name__}")
  prompt = _prompt(obj)
  ids = np.asarray(template.encode_prompt(prompt, tokenizer), np.int32)
  if len(ids) > max_len:
    raise BadRecord(f"the prompt has {len(ids)} tokens, more than ppo.prompt_len ({max_len})")
  return Example((ids, np.ones(len(ids), np.float32)), sum(len(m["content"]) for m in prompt))


# --- sources -> batches

class RecordStream(SourceStream):
  """A SourceStream whose documents are Examples, one per JSON record, made by `encode(obj)`."""

  def __init__(self, *args, encode: Callable[[Any], Example], **kwargs):
    self.encode = encode
    super().__init__(*args, **kwargs)
    containers = sorted({f for f in self.formats if f not in JSONL})
    if containers:
      raise DataError(f"source {self.name}: preference and prompt records are JSON lines "
                      f"({', '.join('.' + f for f in JSONL)}), not {', '.join(containers)}")

  def parse_record(self, fmt: str, raw: Any, path: str, record: int) -> Example | None:
    obj = parse_json_line(raw)
    return None if obj is None else self.encode(obj)

  def record_chars(self, doc: Example) -> int:
    return doc.chars

  def _load_chunk(self) -> None:
    examples, self.next_pos = self.read_texts(self.chunk_pos, self.chunk_read_with)
    self.chunk = (examples, np.arange(len(examples)), None)

  def last_doc(self) -> Example:
    return self.chunk[0][self.consumed - 1]


class Rows:
  """A source's examples as rows of the mixture (the interface of `data.windows.Windows`)."""

  def __init__(self, stream: RecordStream, pad_id: int):
    self.stream, self.pad_id = stream, pad_id

  def get_state(self) -> dict[str, Any]:
    return {"stream": self.stream.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self.stream.set_state(state["stream"])

  def next_window(self) -> tuple[Example] | None:
    example = self.stream.next_doc()
    return None if example is None else (example,)


class Batcher(Packer):
  """A Packer whose rows are whole examples, each field right-padded to `length` (its state,
  token counts and `keep` are the Packer's, so `data.pipeline.DataIterator` runs it)."""

  def __init__(self, mixture: Mixture, rows: int, fields: tuple[str, ...], length: int, pad_id: int,
               keep: slice = slice(None)):
    super().__init__(mixture, rows, length, document_attention=False, keep=keep)
    self.fields, self.length, self.pad_id = fields, length, pad_id

  def next_batch(self) -> dict[str, np.ndarray] | None:
    if self.finished:
      return None
    batch = {f: np.zeros((self.rows, self.length), np.float32) if f.endswith("_mask")
             else np.full((self.rows, self.length), self.pad_id, np.int32) for f in self.fields}
    for r in range(self.rows):
      item = self._next_window("usable records")
      if item is None:
        if r == 0:
          return None
        break
      source, example = item
      for f, array in zip(self.fields, example.arrays):
        batch[f][r, :len(array)] = array
      if r in range(self.rows)[self.keep]:
        self.emitted[source] += sum(len(a) for f, a in zip(self.fields, example.arrays)
                                    if not f.endswith("_mask"))
    return {f: np.ascontiguousarray(a[self.keep]) for f, a in batch.items()}


def make_batcher(data_cfg, tokenizer, length: int, rows: int, seed: int, split: str, process_index: int,
                 process_count: int, events: list[str], *, kind: str) -> Batcher:
  """`data.pipeline.make_packer`'s counterpart: kind "pairs" (rows of `length` = seq_len + 1 tokens)
  or "prompts" (`length` = ppo.prompt_len)."""
  keep = slice(None)
  if data_cfg.get("shard_by") == "replicated" and process_count > 1:
    # As make_packer: every process batches the global batch and keeps its own rows.
    keep = slice(process_index * rows, (process_index + 1) * rows)
    rows, process_index, process_count = rows * process_count, 0, 1
  select = pipeline.selector(data_cfg, split)
  if data_cfg.on_bad_record not in ("warn", "error"):
    raise DataError(f"data.on_bad_record must be 'warn' or 'error', got {data_cfg.on_bad_record!r}")
  fields, encode = {"pairs": (PAIR_FIELDS, encode_pair), "prompts": (PROMPT_FIELDS, encode_prompt)}[kind]
  sources, weights = {}, {}
  for s in pipeline.resolve_sources(data_cfg, split):
    try:
      template = chat.template_for(tokenizer, s["template"])  # "auto": the tokenizer's own
    except ValueError as e:
      raise DataError(f"source {s['name']}: {e}") from None
    stream = RecordStream(
        s["name"], s["files"], s["format"], s["text_field"], s["epochs"], seed, tokenizer, select,
        process_index, process_count, min(int(data_cfg.chunk_chars), CHUNK_CHARS), data_cfg.on_bad_record,
        int(data_cfg.num_threads), events,
        shard_files=pipeline.shard_files(data_cfg, len(s["files"]), process_count),
        encode=lambda obj, t=template: encode(obj, t, tokenizer, length))
    sources[s["name"]], weights[s["name"]] = Rows(stream, tokenizer.pad_id), s["weight"]
  return Batcher(Mixture(sources, weights, events), rows, fields, length, tokenizer.pad_id, keep)


def make_iterator(data_cfg, tokenizer, kind: str, *, length: int, global_batch_size: int, seed: int = 0,
                  split: str = "train", process_index: int = 0,
                  process_count: int = 1) -> pipeline.DataIterator:
  """Batches of this process's `global_batch_size // process_count` rows, made ahead in a thread,
  with a state that resumes them exactly (`data.pipeline.DataIterator`)."""
  return pipeline.make_iterator(data_cfg, tokenizer, seq_len=length, global_batch_size=global_batch_size,
                                seed=seed, split=split, process_index=process_index,
                                process_count=process_count, packer=functools.partial(make_batcher, kind=kind))


def count_batches(data_cfg, tokenizer, kind: str, *, length: int, global_batch_size: int,
                  seed: int = 0, process_index: int = 0, process_count: int = 1) -> int:
  """Batches in this process's training split before every source reaches its epoch limit
  (`data.pipeline.count_batches`)."""
  return pipeline.count_batches(data_cfg, tokenizer, seq_len=length, global_batch_size=global_batch_size,
                                seed=seed, packer=functools.partial(make_batcher, kind=kind),
                                process_index=process_index, process_count=process_count)
