"""The pretraining data pipeline: mixing shares, epoch limits, exact resume, packing, formats, bad
records, document attention, process sharding, validation split, the embedded default corpus."""

import gzip
import json
import logging
import os
import random

import numpy as np
import pytest

from llama_jax import data
from llama_jax.tokenizer import Tokenizer
from llama_jax.tokenizer import train as sp_train

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud "
         "paper light north south water fire green blue red small large quick slow").split()


def make_docs(prefix: str, n: int, seed: int, min_words: int = 5, max_words: int = 60) -> list[str]:
  """Distinct documents: each begins with its own tag so decoded documents can be matched."""
  rng = random.Random(seed)
  return [f"{prefix}{i:04d} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
          for i in range(n)]


def write_jsonl(path, docs, opener=open):
  with opener(path, "wt") as f:
    for d in docs:
      f.write(json.dumps({"text": d, "id": 0}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("tok") / "tok")
  texts = make_docs("doc", 300, 0) + make_docs("src", 100, 1)
  return Tokenizer(sp_train.train(texts, 320, prefix, num_threads=1))


def config(sources, **overrides):
  cfg = data.default_config()
  cfg.sources = {name: data.source(*spec) if isinstance(spec, tuple) else spec
                 for name, spec in sources.items()}
  cfg.holdout_every = 0
  cfg.prefetch = 2
  cfg.num_threads = 1
  cfg.chunk_chars = 2000  # many chunks, so resume crosses chunk boundaries
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def docs_of_stream(tok, batches):
  """The texts of the documents in a run of batches: the token stream cut at BOS, complete ones
  (BOS ... EOS) decoded."""
  stream = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1).reshape(-1) for b in batches])
  out = []
  starts = np.flatnonzero(stream == tok.bos_id)
  for s, e in zip(starts, list(starts[1:]) + [len(stream)]):
    piece = stream[s:e]
    if piece[-1] == tok.eos_id:
      out.append(tok.decode(piece[1:-1]))
  return out, stream


def test_realised_shares_follow_weights(tmp_path, tok):
  a = write_jsonl(tmp_path / "a.jsonl", make_docs("doc", 200, 1))
  b = write_jsonl(tmp_path / "b.jsonl", make_docs("src", 200, 2, 20, 200))
  cfg = config({"a": (a, 0.7), "b": (b, 0.3)})
  it = data.make_iterator(cfg, tok, seq_len=64, global_batch_size=4, seed=0)
  for _ in range(100):
    next(it)
  t = it.source_tokens()
  assert sum(t.values()) == 100 * 4 * 65
  assert abs(t["a"] / sum(t.values()) - 0.7) < 0.02
  assert abs(t["b"] / sum(t.values()) - 0.3) < 0.02


def test_epoch_limit_drops_source_and_renormalises(tmp_path, tok):
  small = make_docs("doc", 10, 3, 5, 20)
  files = {"a": write_jsonl(tmp_path / "a.jsonl", small),
           "b": write_jsonl(tmp_path / "b.jsonl", make_docs("src", 300, 4)),
           "c": write_jsonl(tmp_path / "c.jsonl", make_docs("doc", 300, 5))}
  cfg = config({"a": (files["a"], 0.5, 1), "b": (files["b"], 0.25), "c": (files["c"], 0.25)})
  it = data.make_iterator(cfg, tok, seq_len=32, global_batch_size=2, seed=0)
  events = []
  for _ in range(60):
    next(it)
    events += it.events()
  before = it.source_tokens()
  limit = [e for e in events if "reached its epoch limit (1)" in e]
  assert len(limit) == 1 and limit[0].startswith("source a ")
  assert "renormalised weights: b=0.500, c=0.500" in limit[0]
  # Source a gave each of its documents exactly once (BOS + pieces + EOS).
  assert before["a"] == sum(len(tok.encode(d, bos=True, eos=True)) for d in small)
  for _ in range(150):
    next(it)
  after = it.source_tokens()
  assert after["a"] == before["a"]
  gained_b, gained_c = after["b"] - before["b"], after["c"] - before["c"]
  assert abs(gained_b / (gained_b + gained_c) - 0.5) < 0.02


@pytest.mark.parametrize("document_attention", [False, True])
def test_resume_gives_exactly_the_same_batches(tmp_path, tok, document_attention):
  a = write_jsonl(tmp_path / "a.jsonl.gz", make_docs("doc", 150, 6, 5, 300), opener=gzip.open)
  b = write_jsonl(tmp_path / "b.jsonl", make_docs("src", 150, 7))
  cfg = config({"a": (a, 0.6, 2), "b": (b, 0.4)}, document_attention=document_attention)
  kwargs = dict(seq_len=48, global_batch_size=3, seed=5)
  it = data.make_iterator(cfg, tok, **kwargs)
  for _ in range(23):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as it goes through a checkpoint
  expected = [next(it) for _ in range(40)]
  resumed = data.make_iterator(cfg, tok, **kwargs)
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(40)]):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  assert resumed.source_tokens() == it.source_tokens()
  # set_state also rewinds an iterator that already ran ahead.
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["inputs"], expected[0]["inputs"])
  it.close()  # stopping the read-ahead thread loses nothing either
  np.testing.assert_array_equal(next(it)["inputs"], expected[1]["inputs"])


@pytest.mark.parametrize("resumed_chunk_chars", [300, 9000])
def test_resume_with_another_chunk_size_gives_the_same_batches(tmp_path, tok, resumed_chunk_chars):
  # data.chunk_chars is how much is read per tokenizer call: a run may resume with another. The
  # chunk the state points into is read again as it was read; the document stream is the same.
  a = write_jsonl(tmp_path / "a.jsonl", make_docs("doc", 150, 6, 5, 300))
  cfg = config({"a": (a, 1.0, 2)})
  kwargs = dict(seq_len=48, global_batch_size=3, seed=5)
  it = data.make_iterator(cfg, tok, **kwargs)
  for _ in range(7):  # mid-chunk, a document half used
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(30)]
  resumed = data.make_iterator(config({"a": (a, 1.0, 2)}, chunk_chars=resumed_chunk_chars), tok, **kwargs)
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(30)]):
    np.testing.assert_array_equal(want["inputs"], got["inputs"])
  with pytest.raises(data.DataError, match="data.chunk_chars must be >= 1"):
    data.make_iterator(config({"a": (a, 1.0, 2)}, chunk_chars=0), tok, **kwargs)


def _chunk_sizes(state) -> list[int]:
  """The chunk sizes recorded in an iterator's state (one per source stream)."""
  if isinstance(state, dict):
    return ([state["chunk_chars"]] if "chunk_chars" in state else []) + [
        n for v in state.values() for n in _chunk_sizes(v)]
  return [n for v in state for n in _chunk_sizes(v)] if isinstance(state, list) else []


def test_chunks_start_small_double_and_resume_anywhere(tmp_path, tok, monkeypatch):
  # The first chunk is FIRST_CHUNK_CHARS (the first batch waits for what it needs), each next one
  # twice the last up to data.chunk_chars; the batches are those of fixed-size chunks, and a run
  # resumed from the state after any batch goes on with the same batches.
  a = write_jsonl(tmp_path / "a.jsonl", make_docs("doc", 150, 6, 5, 300))
  kwargs = dict(seq_len=48, global_batch_size=3, seed=5)
  fixed = data.make_iterator(config({"a": (a, 1.0, 2)}), tok, **kwargs)
  want = [next(fixed) for _ in range(60)]
  monkeypatch.setattr(data.sources, "FIRST_CHUNK_CHARS", 250)
  it = data.make_iterator(config({"a": (a, 1.0, 2)}), tok, **kwargs)
  states = []
  for batch in want:
    np.testing.assert_array_equal(next(it)["inputs"], batch["inputs"])
    states.append(json.loads(json.dumps(it.get_state())))
  sizes = [n for s in states for n in _chunk_sizes(s)]
  assert sorted(set(sizes)) == [250, 500, 1000, 2000] and sizes == sorted(sizes), sizes
  for i in (0, 3, 11, 25):  # in the first chunk (twice), a doubled one (500), a full-size one
    resumed = data.make_iterator(config({"a": (a, 1.0, 2)}), tok, **kwargs)
    resumed.set_state(states[i])
    for batch in want[i + 1:i + 8]:
      np.testing.assert_array_equal(next(resumed)["inputs"], batch["inputs"])


def test_packing_keeps_every_token_once_per_epoch(tmp_path, tok):
  docs = make_docs("doc", 60, 8, 1, 400)
  cfg = config({"a": (write_jsonl(tmp_path / "a.jsonl", docs), 1.0, 1)})
  batches = list(data.make_iterator(cfg, tok, seq_len=16, global_batch_size=3, seed=1))
  seen, stream = docs_of_stream(tok, batches)
  assert sorted(seen) == sorted(docs)  # each document exactly once, whole
  expected = [t for d in docs for t in tok.encode(d, bos=True, eos=True)]
  # One source, one file: the windows are the documents' tokens in order, then padding at the end.
  np.testing.assert_array_equal(stream[:len(expected)], expected)
  assert len(stream) - len(expected) < 3 * 17 and (stream[len(expected):] == tok.pad_id).all()
  assert batches[-1]["loss_mask"][-1].sum() == 0 and batches[0]["loss_mask"].all()


@pytest.mark.parametrize("document_attention", [False, True])
def test_documents_shorter_than_a_window_keep_their_last_token(tmp_path, tok, document_attention):
  # Every document here is a few tokens: several share each window. Each keeps its EOS in the
  # stream, and every target that is a document's own token (its EOS included) counts in the loss.
  docs = make_docs("doc", 40, 21, 1, 3)
  cfg = config({"a": (write_jsonl(tmp_path / "a.jsonl", docs), 1.0, 1)}, document_attention=document_attention)
  batches = list(data.make_iterator(cfg, tok, seq_len=32, global_batch_size=2, seed=0))
  seen, stream = docs_of_stream(tok, batches)
  assert sorted(seen) == sorted(docs)
  lengths = [len(tok.encode(d, bos=True, eos=True)) for d in docs]
  real = stream[:sum(lengths)]  # one source, one file: the documents in order, then padding
  assert (real == tok.eos_id).sum() == (real == tok.bos_id).sum() == len(docs)
  # Windows of 33 tokens do not overlap: an EOS is a target unless it opens a window.
  eos_targets = sum(1 for p in np.flatnonzero(real == tok.eos_id) if p % 33)
  targets = np.concatenate([b["targets"] for b in batches])
  mask = np.concatenate([b["loss_mask"] for b in batches])
  assert ((targets == tok.eos_id) & (mask == 1)).sum() == eos_targets
  starts = range(0, len(real), 33)  # a window's first token is no window's target
  if document_attention:  # and a BOS is not predicted across documents
    assert mask.sum() == len(real) - len(docs) - sum(1 for p in starts if real[p] != tok.bos_id)
  else:
    assert mask.sum() == len(real) - len(starts)


def test_packing_two_sources_counts_every_token(tmp_path, tok):
  docs_a, docs_b = make_docs("doc", 30, 16), make_docs("src", 20, 17, 50, 900)
  cfg = config({"a": (write_jsonl(tmp_path / "a.jsonl", docs_a), 0.3, 1),
                "b": (write_jsonl(tmp_path / "b.jsonl", docs_b), 0.7, 1)})
  it = data.make_iterator(cfg, tok, seq_len=32, global_batch_size=2, seed=3)
  batches = list(it)
  count = lambda docs: sum(len(tok.encode(d, bos=True, eos=True)) for d in docs)  # noqa: E731
  assert it.source_tokens() == {"a": count(docs_a), "b": count(docs_b)}
  assert sum(b["loss_mask"].sum() for b in batches) >= count(docs_a + docs_b) - 2 * len(batches) * 2
  assert any("every source is exhausted" in e for e in it.events())


def test_bad_records_are_counted_and_skipped(tmp_path, tok, caplog):
  path = tmp_path / "bad.jsonl"
  good = make_docs("doc", 5, 10)
  with open(path, "wb") as f:
    f.write((json.dumps({"text": good[0]}) + "\n").encode())
    f.write(b"{not json\n")
    f.write((json.dumps({"text": good[1]}) + "\n").encode())
    f.write(b'{"text": "caf\xe9 latin-1"}\n')
    f.write((json.dumps({"body": "no text field"}) + "\n").encode())
    for d in good[2:]:
      f.write((json.dumps({"text": d}) + "\n").encode())
  cfg = config({"a": (str(path), 1.0, 1)})
  with caplog.at_level(logging.WARNING, logger="llama_jax.data"):
    it = data.make_iterator(cfg, tok, seq_len=8, global_batch_size=1, seed=0)
    batches = list(it)
  assert it.bad_records() == {"a": 3}
  messages = [r.getMessage() for r in caplog.records]
  assert any(f"{path}:2: not JSON" in m for m in messages)
  assert any(f"{path}:4: not UTF-8" in m for m in messages)
  assert any(f"{path}:5: no text field 'text'" in m for m in messages)
  seen, _ = docs_of_stream(tok, batches)
  assert sorted(seen) == sorted(good)

  cfg.on_bad_record = "error"
  with pytest.raises(data.DataError, match=f"{path}:2: not JSON"):
    next(data.make_iterator(cfg, tok, seq_len=8, global_batch_size=1, seed=0))


def _write_format(tmp_path, fmt, docs):
  if fmt == "txt":
    for i, d in enumerate(docs):
      (tmp_path / f"doc{i}.txt").write_text(d)
    return str(tmp_path / "*.txt")
  if fmt == "jsonl":
    return write_jsonl(tmp_path / "d.jsonl", docs)
  if fmt == "jsonl.gz":
    return write_jsonl(tmp_path / "d.jsonl.gz", docs, opener=gzip.open)
  if fmt == "jsonl.zst":
    import zstandard
    raw = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    return str(tmp_path / "d.jsonl.zst")
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet", row_group_size=7)
  return str(tmp_path / "d.parquet")


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet"])
def test_each_format_reads_every_document(tmp_path, tok, fmt):
  docs = make_docs("doc", 30, 11)
  cfg = config({"a": (_write_format(tmp_path, fmt, docs), 1.0, 1)})
  it = data.make_iterator(cfg, tok, seq_len=4, global_batch_size=1, seed=0)
  seen, _ = docs_of_stream(tok, list(it))
  assert sorted(seen) == sorted(docs)
  # Resume inside the file (seek for .jsonl, skipping lines / row groups for the others).
  it = data.make_iterator(cfg, tok, seq_len=4, global_batch_size=1, seed=0)
  for _ in range(57):
    next(it)
  state, expected = it.get_state(), [next(it)["inputs"] for _ in range(30)]
  it.set_state(state)
  np.testing.assert_array_equal(np.stack([next(it)["inputs"] for _ in range(30)]), np.stack(expected))


def test_document_attention_positions_and_segments(tmp_path, tok):
  cfg = config({"a": (write_jsonl(tmp_path / "a.jsonl", make_docs("doc", 80, 12, 1, 3)), 1.0)},
               document_attention=True)
  for b in [next(data.make_iterator(cfg, tok, seq_len=40, global_batch_size=4, seed=0))]:
    inputs, targets = b["inputs"], b["targets"]
    for r in range(inputs.shape[0]):
      # Independently: a document piece starts at the row start and at every BOS.
      starts = [t for t in range(inputs.shape[1]) if t == 0 or inputs[r, t] == tok.bos_id]
      expected_seg = np.cumsum([1 if t in starts else 0 for t in range(inputs.shape[1])])
      expected_pos = [t - max(s for s in starts if s <= t) for t in range(inputs.shape[1])]
      np.testing.assert_array_equal(b["segment_ids"][r], expected_seg)
      np.testing.assert_array_equal(b["positions"][r], expected_pos)
      np.testing.assert_array_equal(b["loss_mask"][r], (targets[r] != tok.bos_id).astype(np.float32))
    assert b["segment_ids"].max() > 2 and b["loss_mask"].min() == 0.0
  cfg.document_attention = False
  b = next(data.make_iterator(cfg, tok, seq_len=40, global_batch_size=4, seed=0))
  np.testing.assert_array_equal(b["positions"], np.tile(np.arange(40), (4, 1)))
  assert not b["segment_ids"].any() and b["loss_mask"].all()
  assert {k: v.dtype.name for k, v in b.items()} == {
      "inputs": "int32", "targets": "int32", "positions": "int32", "segment_ids": "int32",
      "loss_mask": "float32"}
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


def test_processes_read_disjoint_shares_that_cover_the_data(tmp_path, tok):
  docs = make_docs("doc", 90, 13)
  cfg = config({"a": (write_jsonl(tmp_path / "a.jsonl.gz", docs, opener=gzip.open), 1.0, 1)})
  shares = []
  for p in range(2):
    batches = list(data.make_iterator(cfg, tok, seq_len=8, global_batch_size=4, seed=0,
                                      process_index=p, process_count=2))
    assert batches and all(b["inputs"].shape == (2, 8) for b in batches)
    shares.append(set(docs_of_stream(tok, batches)[0]))
  assert not shares[0] & shares[1]
  assert shares[0] | shares[1] == set(docs)


def test_a_replicated_run_resumes_exactly_on_another_process_count(tmp_path, tok):
  # shard_by="replicated": every process packs the whole global batch and keeps its rows, so a run
  # saved by two processes goes on with one (or the reverse) exactly where it was.
  cfg = config({"a": (write_jsonl(tmp_path / "a.jsonl", make_docs("doc", 120, 8)), 1.0)},
               shard_by="replicated")
  kwargs = dict(seq_len=16, global_batch_size=4, seed=3)
  two = [data.make_iterator(cfg, tok, **kwargs, process_index=p, process_count=2) for p in range(2)]
  for it in two:
    for _ in range(7):
      next(it)
  saved = json.loads(json.dumps([it.get_state() for it in two]))  # as the checkpoint holds them
  one = data.make_iterator(cfg, tok, **kwargs)
  for _ in range(7):
    next(one)
  expected = [next(one) for _ in range(5)]
  resumed = data.make_iterator(cfg, tok, **kwargs)
  resumed.set_state(data.resume_state(saved, cfg, 0, 1))
  for want, got in zip(expected, [next(resumed) for _ in range(5)]):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  # The tokens taken so far, which the metrics sum over processes, are carried over whole.
  assert resumed.source_tokens() == one.source_tokens()
  # Back to two processes: each keeps its half of the one-process batch.
  saved_one, taken = one.get_state(), one.source_tokens()
  following = next(one)["inputs"]
  halves = [data.make_iterator(cfg, tok, **kwargs, process_index=p, process_count=2) for p in range(2)]
  for p, it in enumerate(halves):
    it.set_state(data.resume_state([saved_one], cfg, p, 2))
  assert {n: sum(it.source_tokens()[n] for it in halves) for n in taken} == taken
  for p, it in enumerate(halves):
    np.testing.assert_array_equal(next(it)["inputs"], following[2 * p:2 * p + 2])
  for it in two + [one, resumed] + halves:
    it.close()


def test_another_process_count_is_refused_where_processes_split_the_data(tmp_path, tok):
  cfg = config({"a": (write_jsonl(tmp_path / "a.jsonl", make_docs("doc", 20, 8)), 1.0)})
  states = [data.make_iterator(cfg, tok, seq_len=8, global_batch_size=4, process_index=p,
                               process_count=2).get_state() for p in range(2)]
  assert data.resume_state(states, cfg, 1, 2) == states[1]
  with pytest.raises(data.DataError, match="written by 2 processes, this run has 1"):
    data.resume_state(states, cfg, 0, 1)


def test_processes_split_many_files_by_file(tmp_path, tok):
  docs = make_docs("doc", 64, 18)
  for i in range(8):
    write_jsonl(tmp_path / f"part-{i}.jsonl", docs[i * 8:(i + 1) * 8])
  cfg = config({"a": (str(tmp_path / "part-*.jsonl"), 1.0, 1)}, shard_by="files")
  shares = []
  for p in range(2):
    it = data.make_iterator(cfg, tok, seq_len=8, global_batch_size=4, seed=2, process_index=p,
                            process_count=2)
    shares.append(set(docs_of_stream(tok, list(it))[0]))
    # Whole files: each file's documents all went to one process.
    assert all(set(docs[i * 8:(i + 1) * 8]) <= shares[-1] or not set(docs[i * 8:(i + 1) * 8]) & shares[-1]
               for i in range(8))
  assert not shares[0] & shares[1] and shares[0] | shares[1] == set(docs)
  assert len(shares[0]) == len(shares[1]) == 32


def test_eval_split_is_held_out_fixed_and_finite(tmp_path, tok):
  docs = make_docs("doc", 200, 14)
  cfg = config({"a": (write_jsonl(tmp_path / "a.jsonl", docs), 1.0, 1)}, holdout_every=10, eval_batches=3)
  evals = [list(data.make_iterator(cfg, tok, seq_len=16, global_batch_size=2, seed=0, split="eval"))
           for _ in range(2)]
  assert len(evals[0]) == 3
  for x, y in zip(*evals):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  eval_docs = set(docs_of_stream(tok, evals[0])[0])
  train_docs = set(docs_of_stream(tok, list(data.make_iterator(
      cfg, tok, seq_len=16, global_batch_size=2, seed=0, split="train")))[0])
  assert eval_docs and not eval_docs & train_docs
  assert 10 <= len(docs) - len(train_docs) <= 30  # about one in ten held out
  # An eval iterator read only up to eval_batches and dropped leaves no read-ahead thread behind.
  it = data.make_iterator(cfg, tok, seq_len=16, global_batch_size=2, seed=0, split="eval")
  next(it)
  thread = it._thread  # pylint: disable=protected-access
  del it
  thread.join(timeout=60)  # returns as soon as the thread ends; the timeout only bounds a failure
  assert not thread.is_alive()


def test_bad_configs_are_data_errors(tmp_path, tok):
  good = write_jsonl(tmp_path / "a.jsonl", make_docs("doc", 5, 15))
  with pytest.raises(data.DataError, match="no files match .*nothing-\\*.jsonl"):
    data.make_iterator(config({"a": (str(tmp_path / "nothing-*.jsonl"), 1.0)}), tok, seq_len=8,
                       global_batch_size=1)
  with pytest.raises(data.DataError, match="data.sources.a.weight must be >= 0"):
    data.make_iterator(config({"a": (good, -1.0)}), tok, seq_len=8, global_batch_size=1)
  with pytest.raises(data.DataError, match="format"):
    (tmp_path / "x.csv").write_text("a,b\n")
    data.make_iterator(config({"a": (str(tmp_path / "x.csv"), 1.0)}), tok, seq_len=8, global_batch_size=1)
  typo = data.source(good, 1.0)
  typo.epoch = 2
  with pytest.raises(data.DataError, match="data.sources.a: unknown keys epoch"):
    data.make_iterator(config({"a": typo}), tok, seq_len=8, global_batch_size=1)
  books = config({"b": ("books:shakespeare", 1.0)}, cache_dir=str(tmp_path / "cache"))
  with pytest.raises(data.DataError, match="not downloaded yet: run `python -m llama_jax.data.books"):
    data.make_iterator(books, tok, seq_len=8, global_batch_size=1)
  (tmp_path / "empty.jsonl").write_text("\n\n")
  with pytest.raises(data.DataError, match="no documents in any source"):
    next(data.make_iterator(config({"e": (str(tmp_path / "empty.jsonl"), 1.0)}), tok, seq_len=8,
                            global_batch_size=1))


@pytest.mark.slow
def test_default_corpus_end_to_end(tmp_path):
  cfg = data.default_config()
  cfg.cache_dir = str(tmp_path / "cache")
  cfg.vocab_size, cfg.tokenizer_train_chars = 512, 1_000_000
  path = data.ensure_tokenizer(cfg, str(tmp_path / "workdir"))
  mtime = os.path.getmtime(path)
  assert data.ensure_tokenizer(cfg, str(tmp_path / "workdir")) == path  # cached, not retrained
  assert os.path.getmtime(path) == mtime
  tok = Tokenizer(path)
  assert tok.vocab_size == 512 and tok.bos_id == 1 and tok.eos_id == 2
  it = data.make_iterator(cfg, path, seq_len=128, global_batch_size=4, seed=0)
  batches = [next(it) for _ in range(20)]
  assert batches[0]["inputs"].shape == (4, 128)
  shares = it.source_tokens()
  assert set(shares) == {"code", "prose"} and abs(shares["code"] / sum(shares.values()) - 0.5) < 0.05
  text = " ".join(tok.decode(b["inputs"].reshape(-1)) for b in batches)
  assert "def " in text and "import" in text
  assert len(list(data.make_iterator(cfg, path, seq_len=128, global_batch_size=4, split="eval"))) == 8
