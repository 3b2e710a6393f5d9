"""The `config.data` block: which text sources to mix, how to tokenise and pack them."""

from __future__ import annotations

import ml_collections


def source(path: str, weight: float, epochs: int = 0, text_field: str = "text",
           format: str = "", template: str = "auto") -> ml_collections.ConfigDict:  # pylint: disable=redefined-builtin
  """One entry of `data.sources` / `data.eval_sources`."""
  return ml_collections.ConfigDict(dict(
      path=path,  # a file, a glob, "embedded:<name>" (the interpreter's corpus), "demo:chat" (sft_demo)
      weight=float(weight),  # share of the training tokens (weights are normalised to sum to 1)
      epochs=int(epochs),  # passes over the source at most; 0: unlimited (it repeats)
      text_field=text_field,  # the JSON key / parquet column holding the document text
      # "" (by extension), "txt", "jsonl", "jsonl.gz", "jsonl.zst" or "parquet"; or conversations
      # (llama_jax.data.sft): "sharegpt" or "alpaca", in .jsonl[.gz|.zst] files, loss on the answers
      format=format,
      # the chat template of a conversation source: "auto" (the model's own when its tokenizer has
      # one, else vicuna_v1.1) or a built-in of llama_jax.tokenizer.chat.TEMPLATES
      template=template,
  ))


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Source name -> {path, weight, epochs, text_field, format}. The default is the embedded corpus:
  # the standard library's own Python code and the documentation shipped with the interpreter,
  # written as jsonl shards into the cache directory on first use (no download).
  c.sources = ml_collections.ConfigDict(dict(
      code=source("embedded:code", 0.5),
      prose=source("embedded:prose", 0.5),
  ))
  # Validation sources, same shape as `sources`. Empty: every `holdout_every`-th record of each
  # training source is held out of training and used for eval/loss instead.
  c.eval_sources = ml_collections.ConfigDict()
  c.holdout_every = 100  # with no eval_sources: 1 record in this many goes to eval (0: none)
  c.eval_batches = 8  # eval/loss is the mean over this fixed set of batches
  # a tokenizer.json, a SentencePiece .model or a folder holding one; "": the init_from checkpoint's,
  # else a SentencePiece model trained on the sources on first use (cached)
  c.tokenizer = ""
  c.vocab_size = 4096  # vocabulary of a tokenizer trained on first use (must equal model.vocab_size)
  c.tokenizer_train_chars = 20_000_000  # characters sampled (by weight) to train that tokenizer
  c.cache_dir = ""  # embedded corpus and trained tokenizers; "": $LLAMA_JAX_CACHE or ~/.cache/llama_jax
  c.document_attention = False  # True: segment ids and per-document positions keep attention in documents
  c.on_bad_record = "warn"  # a record that is not JSON / not UTF-8: "warn" (count and skip) or "error"
  # How several processes (hosts) split a source: "files" (each reads only its own files), "records"
  # (each reads every file and keeps every n-th record), "auto": files when there are >= 4 per process,
  # "replicated" (each packs the whole global batch and keeps its rows: the batches of a one-process
  # run whatever the process count, for exact reproducibility, and a resume on another process
  # count; every host tokenises everything).
  c.shard_by = "auto"
  c.prefetch = 4  # batches prepared ahead in a background thread
  c.num_threads = 0  # sentencepiece encoding threads; 0: all cores (a tokenizer.json: its own pool)
  c.chunk_chars = 1 << 20  # characters read and encoded per call into the tokenizer (per source)
  return c
