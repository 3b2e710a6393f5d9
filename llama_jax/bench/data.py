"""Benchmark of the pretraining data pipeline: tokens/s through `data.make_iterator` (read, parse,
encode, mix, pack, prefetch) with a SentencePiece tokenizer and with Hugging Face `tokenizers`
ones, each tokenizer alone on the same text, and the resident memory while streaming a generated
multi-GB jsonl file (it must stay flat: readers stream).

  python -m llama_jax.bench data [--seconds 30] [--seq_len 2048] [--batch_size 8] [--memory_gb 2.5]
                                 [--tokenizer PATH] [--hf_tokenizer PATH]

The tokenizers compared on the same text (the default sources' first documents): the SentencePiece
model (`--tokenizer`, default the default config's), `hf_converted` (that model written as a
tokenizer.json by `tokenizer.spm_json`: the same ids, through the Rust library) and `hf_byte_level`
(a byte-level BPE with Llama 3's pre-tokenizer, trained here by `tokenizers` on the same text with
the same vocabulary size), or `--hf_tokenizer`. Each is timed on 1 thread and on every core, in
turns (`--repeats` rounds; the best of each), reporting tokens/s and characters/s (tokenizers
with other vocabularies make other numbers of tokens from the same text), and characters per
CPU-second of the process (all its threads): what a core does, whatever else shares the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time

import numpy as np


def rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(cfg, tokenizer, seq_len: int, batch_size: int, seconds: float) -> dict:
  from llama_jax import data
  it = data.make_iterator(cfg, tokenizer, seq_len=seq_len, global_batch_size=batch_size, seed=0)
  for _ in range(3):  # warm up: first chunks, thread start
    next(it)
  start, batches = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    next(it)
    batches += 1
  elapsed = time.perf_counter() - start
  it.close()
  return {"tokens_per_s": batches * batch_size * seq_len / elapsed, "batches": batches,
          "seconds": elapsed, "shares": it.source_tokens()}


def sample_texts(cfg, chars: int = 4_000_000) -> list[str]:
  """The first documents of each default source, about `chars` characters in all."""
  from llama_jax.data.pipeline import resolve_sources
  texts = []
  for s in resolve_sources(cfg, "train"):
    n = 0
    with open(s["files"][0]) as f:
      for line in f:
        texts.append(json.loads(line)[s["text_field"]])
        n += len(texts[-1])
        if n > chars // 2:
          break
  return texts


def train_byte_level(texts: list[str], vocab_size: int, directory: str) -> str:
  """A Llama 3-style byte-level BPE trained by `tokenizers` on `texts`; the folder it is saved in."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  from llama_jax.tokenizer.meta_llama3 import SPLIT as LLAMA3_SPLIT  # Llama 3's pre-tokenizer regex
  tok = Tokenizer(models.BPE(ignore_merges=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  specials = ["<|begin_of_text|>", "<|end_of_text|>"]
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id(specials[0]))])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[1]}, f)
  return directory


def tokenizers_alone(tokenizers: dict, texts: list[str], repeats: int) -> dict:
  """{name: {threads_T: {tokens_per_s, chars_per_s}}}, the best of `repeats` rounds in which the
  tokenizers take turns (on a shared machine the load changes between rounds, not within one)."""
  chars = sum(map(len, texts))
  best: dict = {}
  for _ in range(repeats):
    for name, tok in tokenizers.items():
      for threads in sorted({1, os.cpu_count() or 1}):
        start, cpu_start = time.perf_counter(), time.process_time()
        ids = tok.encode_batch(texts, bos=True, eos=True, num_threads=threads)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        row = best.setdefault(name, {}).setdefault(f"threads_{threads}", {"seconds": float("inf")})
        if seconds < row["seconds"]:
          row.update(seconds=seconds, tokens=sum(map(len, ids)), tokens_per_s=sum(map(len, ids)) / seconds,
                     chars_per_s=chars / seconds)
        row["chars_per_cpu_s"] = max(row.get("chars_per_cpu_s", 0.0), chars / cpu_seconds)
  return best


def write_big_jsonl(path: str, gigabytes: float, cfg) -> int:
  """A jsonl file of about `gigabytes` GB: the embedded corpus repeated, each copy tagged."""
  from llama_jax.data.pipeline import resolve_sources
  docs = []
  for s in resolve_sources(cfg, "train"):
    for file in s["files"]:
      with open(file) as f:
        docs += [json.loads(line)["text"] for line in f]
  lines = [json.dumps({"text": d}) + "\n" for d in docs]
  written, copy = 0, 0
  with open(path, "w") as f:
    while written < gigabytes * 1e9:
      for line in lines:
        f.write(line)
        written += len(line)
      copy += 1
  return written


def memory(cfg, tokenizer, gigabytes: float, directory: str, seq_len: int, batch_size: int) -> dict:
  """Streams the whole generated file through the pipeline as process 0 of 64 (it reads every line
  and tokenises its 1/64 share, so one pass is quick) while sampling the RSS."""
  from llama_jax import data
  path = os.path.join(directory, f"llama_jax_bench_{os.getpid()}.jsonl")
  try:
    start = time.perf_counter()
    size = write_big_jsonl(path, gigabytes, cfg)
    write_s = time.perf_counter() - start
    big = data.default_config()
    big.update({k: cfg[k] for k in ("cache_dir", "num_threads")})
    big.sources = {"big": data.source(path, 1.0, epochs=1)}
    big.holdout_every = 0
    it = data.make_iterator(big, tokenizer, seq_len=seq_len, global_batch_size=batch_size * 64,
                            seed=0, process_index=0, process_count=64)
    samples, stop = [rss_mb()], threading.Event()

    def sample():
      while not stop.wait(0.5):
        samples.append(rss_mb())
    threading.Thread(target=sample, daemon=True).start()
    start, batches = time.perf_counter(), 0
    for _ in it:
      batches += 1
    stop.set()
    stream_s = time.perf_counter() - start
    return {"file_gb": size / 1e9, "write_s": write_s, "stream_s": stream_s, "batches": batches,
            "rss_mb_start": samples[0], "rss_mb_max": max(samples), "rss_mb_end": samples[-1],
            "peak_rss_mb_process": peak_rss_mb(), "read_mb_per_s": size / 1e6 / stream_s}
  finally:
    if os.path.exists(path):
      os.remove(path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m llama_jax.bench data", description=__doc__.split("\n\n")[0])
  p.add_argument("--seconds", type=float, default=30.0, help="how long to measure each pipeline")
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--memory_gb", type=float, default=2.5, help="size of the generated jsonl; 0: skip")
  p.add_argument("--tmp", default="/tmp", help="where the generated file is written (and deleted)")
  p.add_argument("--cache_dir", default="", help="data.cache_dir (embedded corpus, tokenizers)")
  p.add_argument("--tokenizer", default="", help="a SentencePiece model; default: the default config's")
  p.add_argument("--hf_tokenizer", default="", help="a tokenizer.json (or its folder) to compare; "
                 "default: the SentencePiece model converted, and a byte-level BPE trained here")
  p.add_argument("--repeats", type=int, default=3, help="rounds of the tokenizers-alone timing")
  p.add_argument("--chars", type=int, default=4_000_000, help="characters of text for the timing")
  args = p.parse_args(argv)
  from llama_jax import data
  from llama_jax.tokenizer import TokenizerError, load_tokenizer
  cfg = data.default_config()
  cfg.cache_dir = args.cache_dir
  cfg.tokenizer = args.tokenizer
  with tempfile.TemporaryDirectory(dir=args.tmp) as scratch:
    try:
      tokenizer = load_tokenizer(data.ensure_tokenizer(cfg))
      texts = sample_texts(cfg, args.chars)
      if args.hf_tokenizer:
        others = {"hf": load_tokenizer(args.hf_tokenizer)}
      else:
        tokenizer.save(os.path.join(scratch, "converted"), for_transformers=True)
        byte_level = train_byte_level(texts, tokenizer.vocab_size, os.path.join(scratch, "byte_level"))
        others = {"hf_converted": load_tokenizer(os.path.join(scratch, "converted")),
                  "hf_byte_level": load_tokenizer(byte_level)}
    except (data.DataError, TokenizerError, OSError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    result = {"cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "tokenizer": tokenizer.path,
              "vocab_size": tokenizer.vocab_size, "seq_len": args.seq_len, "batch_size": args.batch_size,
              "text_chars": sum(map(len, texts))}
    everyone = {type(tokenizer).__name__: tokenizer, **others}
    result["tokenizer_alone"] = tokenizers_alone(everyone, texts, args.repeats)
    result["pipeline"] = {name: throughput(cfg, tok, args.seq_len, args.batch_size, args.seconds)
                          for name, tok in everyone.items()}
  if args.memory_gb > 0:
    result["memory"] = memory(cfg, tokenizer, args.memory_gb, args.tmp, args.seq_len, args.batch_size)
  result["load_avg_1min_end"] = os.getloadavg()[0]
  # One line, as every bench command's last line is (scripts read it with `tail -1`).
  print(json.dumps(result, default=lambda x: float(x) if isinstance(x, np.floating) else str(x)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
