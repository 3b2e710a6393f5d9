"""The data iterator the training loop calls: sources -> mixture -> packing -> batches, prepared in a
background thread, with a JSON state that resumes it exactly.

  it = make_iterator(data_cfg, tokenizer, seq_len=T, global_batch_size=B, seed=s, split="train",
                     process_index=p, process_count=n)
  batch = next(it)  # {'inputs', 'targets', 'positions', 'segment_ids': int32, 'loss_mask': float32}, (B/n, T)

Several hosts: process p reads every n-th file of each source (in the epoch's shuffled order, the
same on every host) when the source has at least 4n files, else every n-th selected record, and
packs its own B/n rows, so the hosts' data are disjoint and cover the split (`data.shard_by`).

Validation: `data.eval_sources` if given, else the held-out records of the training sources (every
`holdout_every`-th record per file, chosen by file name and record number, never trained on). The
eval iterator repeats its sources and stops after `eval_batches` batches, so every evaluation sees
the same fixed set, and every host yields the same number of batches.

Conversation sources (`format: "sharegpt" | "alpaca"`, `llama_jax.data.sft`) give documents with a
loss mask on the assistant's answers; `count_batches` says how many batches the training iterator
yields before every source reaches its epoch limit (a fine-tuning run's number of steps).
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Callable

import numpy as np

from llama_jax.data import corpus
from llama_jax.data.errors import DataError
from llama_jax.data.mixture import Mixture
from llama_jax.data.packing import Packer
from llama_jax.data.records import CONVERSATION_FORMATS, expand, file_format
from llama_jax.data.sources import SourceStream
from llama_jax.data.windows import Windows
from llama_jax.tokenizer import chat

STATE_VERSION = 1
SOURCE_KEYS = {"path", "weight", "epochs", "text_field", "format", "template"}


def resolve_sources(data_cfg, split: str = "train") -> list[dict[str, Any]]:
  """[{name, files, format, text_field, template, weight, epochs}] of a split, validated: a glob
  matching nothing, an unknown format or template, a negative weight or no positive weight are
  DataErrors."""
  if split not in ("train", "eval"):
    raise DataError(f"split must be 'train' or 'eval', got {split!r}")
  own_eval = split == "eval" and len(data_cfg.eval_sources) > 0
  block = data_cfg.eval_sources if own_eval else data_cfg.sources
  where = "data.eval_sources" if own_eval else "data.sources"
  if not len(block):
    raise DataError(f"{where} is empty")
  out, embedded = [], None
  for name in sorted(block):
    s = block[name]
    unknown = sorted(set(s.keys()) - SOURCE_KEYS)
    if unknown:
      raise DataError(f"{where}.{name}: unknown keys {', '.join(unknown)} "
                      f"(known: {', '.join(sorted(SOURCE_KEYS))})")
    weight = float(s.get("weight", 1.0))
    if weight < 0 or not np.isfinite(weight):
      raise DataError(f"{where}.{name}.weight must be >= 0, got {weight}")
    epochs = int(s.get("epochs", 0) or 0)
    if epochs < 0:
      raise DataError(f"{where}.{name}.epochs must be >= 0 (0: unlimited), got {epochs}")
    if weight == 0:
      continue
    path = str(s.get("path", ""))
    if not path:
      raise DataError(f"{where}.{name}.path is empty")
    if path.startswith("embedded:"):
      embedded = embedded or corpus.ensure(data_cfg.cache_dir)
      if path[len("embedded:"):] not in embedded:
        raise DataError(f"{where}.{name}.path: no embedded source {path!r}; known: "
                        + ", ".join(f"embedded:{n}" for n in embedded))
      path = embedded[path[len("embedded:"):]]
    elif path.startswith("books:"):
      from llama_jax.data import books
      path = books.resolve(path[len("books:"):], data_cfg.cache_dir)
    elif path.startswith("demo:"):
      from llama_jax.data import preference_demo, sft_demo
      name = path[len("demo:"):]
      demo = preference_demo if name in preference_demo.NAMES else sft_demo
      path = demo.resolve(name, data_cfg.cache_dir)
    try:
      files = expand(path)
      fmt = str(s.get("format", "") or "")
      for f in files:
        file_format(f, fmt)
    except DataError as e:
      raise DataError(f"{where}.{name}: {e}") from None
    template = str(s.get("template", "") or chat.AUTO)
    if fmt in CONVERSATION_FORMATS and template not in chat.NAMES:
      raise DataError(f"{where}.{name}.template: unknown chat template {template!r}; known: "
                      + ", ".join(chat.NAMES))
    out.append(dict(name=name, files=files, format=fmt, text_field=str(s.get("text_field", "text")),
                    template=template, weight=weight, epochs=0 if split == "eval" else epochs))
  if not out:
    raise DataError(f"{where}: every weight is 0")
  return out


def selector(data_cfg, split: str) -> Callable[[int, int], bool]:
  """Which records (file key, record number) belong to the split."""
  every = int(data_cfg.holdout_every)
  if len(data_cfg.eval_sources) or every <= 0:
    if split == "eval" and not len(data_cfg.eval_sources):
      raise DataError("no validation data: set data.eval_sources or data.holdout_every > 0")
    return lambda key, record: True
  if split == "eval":
    return lambda key, record: (key + record) % every == 0
  return lambda key, record: (key + record) % every != 0


def shard_files(data_cfg, n_files: int, process_count: int) -> bool:
  """Whether processes split a source by files rather than by records (see data.shard_by)."""
  mode = data_cfg.shard_by
  if mode == "replicated":
    return False
  if mode not in ("auto", "files", "records"):
    raise DataError(f"data.shard_by must be 'auto', 'files', 'records' or 'replicated', got {mode!r}")
  if mode == "files" and n_files < process_count:
    raise DataError(f"data.shard_by='files' needs at least as many files as processes "
                    f"({n_files} < {process_count})")
  return mode == "files" or (mode == "auto" and n_files >= 4 * process_count)


def _tokenizer(tokenizer):
  if isinstance(tokenizer, str):
    from llama_jax.tokenizer import load_tokenizer
    return load_tokenizer(tokenizer)
  return tokenizer


def make_packer(data_cfg, tokenizer, seq_len: int, rows: int, seed: int, split: str,
                process_index: int, process_count: int, events: list[str]) -> Packer:
  keep = slice(None)
  if data_cfg.get("shard_by") == "replicated" and process_count > 1:
    # Every process packs the whole global batch and keeps its block of rows: the batches are
    # those of a one-process run, whatever the process count, at the price of every host
    # reading and tokenising everything.
    keep = slice(process_index * rows, (process_index + 1) * rows)
    rows, process_index, process_count = rows * process_count, 0, 1
  select = selector(data_cfg, split)
  if data_cfg.on_bad_record not in ("warn", "error"):
    raise DataError(f"data.on_bad_record must be 'warn' or 'error', got {data_cfg.on_bad_record!r}")
  windows, weights = {}, {}
  for s in resolve_sources(data_cfg, split):
    args = (s["name"], s["files"], s["format"], s["text_field"], s["epochs"], seed, tokenizer, select,
            process_index, process_count, int(data_cfg.chunk_chars), data_cfg.on_bad_record,
            int(data_cfg.num_threads), events)
    by_files = dict(shard_files=shard_files(data_cfg, len(s["files"]), process_count))
    if s["format"] in CONVERSATION_FORMATS:
      from llama_jax.data.sft import ConversationStream
      template = chat.template_for(tokenizer, s["template"])  # "auto": the tokenizer's own
      stream = ConversationStream(*args, **by_files, template=template, max_len=seq_len + 1)
      windows[s["name"]] = Windows(stream, seq_len + 1, tokenizer.pad_id, split_docs=False)
    else:
      stream = SourceStream(*args, **by_files)
      windows[s["name"]] = Windows(stream, seq_len + 1, tokenizer.pad_id)
    weights[s["name"]] = s["weight"]
  return Packer(Mixture(windows, weights, events), rows, seq_len, bool(data_cfg.document_attention), keep)


def _counts(packer: Packer) -> dict[str, dict[str, int]]:
  """Per source: records skipped as bad, conversation turns truncated."""
  sources = packer.mixture.sources.items()
  return {"bad": {n: w.stream.bad_records for n, w in sources},
          "truncated": {n: w.stream.truncated_turns for n, w in sources}}


def _produce(packer: Packer, events: list[str], batches: int, max_batches: int | None, split: str,
             out: queue.Queue, stop: threading.Event) -> None:
  """The read-ahead thread: puts ("batch", batch, state, tokens, counts, events) items, then
  ("end", events) or ("error", exception). It holds no reference to the DataIterator, so dropping
  the iterator (its __del__ sets `stop`) ends the thread."""

  def put(item) -> bool:
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  try:
    while max_batches is None or batches < max_batches:
      batch = packer.next_batch()
      if batch is None:
        break
      batches += 1
      state = {"version": STATE_VERSION, "split": split, "batches": batches, "packer": packer.get_state()}
      counts = _counts(packer)
      if not put(("batch", batch, state, packer.source_tokens(), counts, list(events))):
        return
      events.clear()
    put(("end", list(events)))
  except Exception as e:  # handed to the consumer, raised by next()
    put(("error", e))


class DataIterator:
  """Batches from a Packer, made ahead in a daemon thread (sentencepiece and numpy release the GIL,
  so it overlaps the training step). Each batch travels with the packer's state right after it, so
  `get_state` is the state after the last batch handed out, not after the read-ahead."""

  def __init__(self, make: Callable[[list[str]], Packer], max_batches: int | None, prefetch: int,
               split: str):
    self._make, self._max, self._prefetch, self.split = make, max_batches, max(1, prefetch), split
    self._events_new: list[str] = []
    self._packer_events: list[str] = []
    self._packer = make(self._packer_events)
    self._state = {"version": STATE_VERSION, "split": split, "batches": 0,
                   "packer": self._packer.get_state()}
    self._tokens = self._packer.source_tokens()
    self._counts = {"bad": {n: 0 for n in self._tokens}, "truncated": {n: 0 for n in self._tokens}}
    self._thread = None
    self._queue: queue.Queue = queue.Queue(self._prefetch)
    self._stop = threading.Event()
    self._finished = False
    self._stale = False

  def _start(self) -> None:
    self._stop = threading.Event()
    self._queue = queue.Queue(self._prefetch)
    self._thread = threading.Thread(
        target=_produce, args=(self._packer, self._packer_events, self._state["batches"], self._max,
                               self.split, self._queue, self._stop), daemon=True, name=f"data-{self.split}")
    self._thread.start()

  def close(self) -> None:
    """Stops the read-ahead thread (it is a daemon: exiting without close is fine too). A later
    next() goes on from the last batch returned: the read-ahead is discarded."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      self._stale = True  # the packer ran ahead of the state

  # --- the iterator
  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._finished:
      raise StopIteration
    if self._thread is None:
      if self._stale:
        self.set_state(self._state)
      self._start()
    kind, *item = self._queue.get()
    if kind == "batch":
      batch, self._state, self._tokens, self._counts, events = item
      self._events_new += events
      return batch
    self._finished = True
    self.close()
    if kind == "error":
      raise item[0]
    self._events_new += item[0]
    if self.split == "train":
      self._events_new.append("the training data are exhausted (every source reached its epoch limit)")
      truncated = {n: c for n, c in self._counts["truncated"].items() if c}
      if truncated:  # the log counts them (the first few are also logged one by one)
        self._events_new.append("conversation turns truncated to seq_len + 1 tokens: " + ", ".join(
            f"{n}={c}" for n, c in truncated.items()))
    raise StopIteration

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state after the last batch returned (goes into the checkpoint)."""
    return copy.deepcopy(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    """The following batches are those the iterator that saved `state` would have given next."""
    if state.get("version") != STATE_VERSION or state.get("split") != self.split:
      raise DataError(f"data state is for split {state.get('split')!r} version {state.get('version')},"
                      f" this iterator is split {self.split!r} version {STATE_VERSION}")
    self.close()
    self._packer_events = []
    self._packer = self._make(self._packer_events)
    self._packer.set_state(state["packer"])
    self._state, self._finished, self._stale = copy.deepcopy(state), False, False
    self._tokens = self._packer.source_tokens()
    self._counts = _counts(self._packer)

  def source_tokens(self) -> dict[str, int]:
    """Tokens this process has put into batches from each source so far."""
    return dict(self._tokens)

  def bad_records(self) -> dict[str, int]:
    """Records skipped as malformed (not JSON / not UTF-8 / no text field / a bad conversation), per
    source, so far (a bad record is counted again in each epoch that reads it)."""
    return dict(self._counts["bad"])

  def truncated_turns(self) -> dict[str, int]:
    """Conversation turns (user and answer) cut to fit seq_len + 1 tokens, per source, so far
    (counted in each epoch); 0 for text sources."""
    return dict(self._counts["truncated"])

  def events(self) -> list[str]:
    """Log lines since the last call (an epoch limit reached and the renormalised weights, bad
    records skipped, the data exhausted); each is returned once."""
    out, self._events_new = self._events_new, []
    return out

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass


def _rows_per_process(seq_len: int, global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise DataError(f"global batch size {global_batch_size} is not divisible by the {process_count} processes")
  if seq_len <= 0 or global_batch_size <= 0:
    raise DataError(f"seq_len and global_batch_size must be positive, got {seq_len}, {global_batch_size}")
  return global_batch_size // process_count


def make_iterator(data_cfg, tokenizer, *, seq_len: int, global_batch_size: int, seed: int = 0,
                  split: str = "train", process_index: int = 0, process_count: int = 1,
                  packer: Callable[..., Packer] | None = None) -> DataIterator:
  """An iterator of packed batches of this process's `global_batch_size // process_count` rows.
  `packer` (default `make_packer`, same arguments) makes the batches: llama_jax.align's batch
  preference pairs and prompts instead of packing text."""
  rows = _rows_per_process(seq_len, global_batch_size, process_count)
  tokenizer = _tokenizer(tokenizer)
  packer = packer or make_packer

  def make(events: list[str]) -> Packer:
    return packer(data_cfg, tokenizer, seq_len, rows, seed, split, process_index, process_count, events)

  max_batches = int(data_cfg.eval_batches) if split == "eval" else None
  return DataIterator(make, max_batches, int(data_cfg.prefetch), split)


def resume_state(states: list[dict[str, Any]], data_cfg, process_index: int,
                 process_count: int) -> dict[str, Any]:
  """This process's data state from those that every process of a checkpoint saved. The same
  process count: its own. Another count resumes exactly only with data.shard_by="replicated", where
  every process packs the whole global batch, so their packers' states are one; the tokens counted
  so far go to process 0 (the metrics report their sum over processes, which stays exact)."""
  if len(states) == process_count:
    return states[process_index]
  if data_cfg.get("shard_by") != "replicated":
    raise DataError(f"the checkpoint was written by {len(states)} processes, this run has {process_count}: "
                    "each process's data position cannot be carried over (data.shard_by='replicated' "
                    "can: every process packs the whole batch)")
  state = copy.deepcopy(states[0])
  emitted = state["packer"]["emitted"]
  for name in emitted:
    emitted[name] = sum(s["packer"]["emitted"][name] for s in states) if process_index == 0 else 0
  return state


def count_batches(data_cfg, tokenizer, *, seq_len: int, global_batch_size: int, seed: int = 0,
                  packer: Callable[..., Packer] | None = None, process_index: int = 0,
                  process_count: int = 1) -> int:
  """How many batches this process's training iterator yields before every source reaches its
  epoch limit: the steps of a fine-tuning run (`num_steps: 0`). It packs the process's share of the
  data once (reading every epoch), counting rows only; every source needs an epoch limit. Several
  processes pack shares of their own and stop together at the first one's end (`train.loop`
  takes the least count); a process whose share is empty counts 0."""
  unlimited = [s["name"] for s in resolve_sources(data_cfg, "train") if not s["epochs"]]
  if unlimited:
    raise DataError(f"data.sources {', '.join(unlimited)}: epochs is 0 (the source repeats without "
                    "end), so the data do not say how long to train: set num_steps, or give every "
                    "source an epoch limit")
  rows = _rows_per_process(seq_len, global_batch_size, process_count)
  # The iterator's packer; its last batch is completed with padding rows.
  packer = (packer or make_packer)(data_cfg, _tokenizer(tokenizer), seq_len, rows, seed, "train",
                                   process_index, process_count, [])
  rows = 0
  while packer.mixture.next_window() is not None:
    rows += 1
  if not rows and process_count == 1:
    raise DataError("no documents in any source of the training split: " + ", ".join(packer.mixture.names))
  return -(-rows // packer.rows)  # packer.rows: the global batch where every process packs it all
