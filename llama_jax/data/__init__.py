"""Pretraining and fine-tuning data: weighted mixtures of streamed text or conversation sources,
tokenised, packed into batches by a resumable prefetching iterator (`pipeline` states the contract).

  records          reading files one record at a time (txt, jsonl[.gz|.zst], parquet)
  conversations    ShareGPT / Alpaca records -> checked messages
  sources          one source's tokenised document stream, split between processes, resumable
  windows          one source cut into windows of seq_len + 1 tokens
  mixture          the weighted, deterministic mixture of sources, with epoch limits
  packing          rows into batches (positions, segment ids, loss mask)
  sft              conversations -> documents with a loss mask on the answers (Vicuna's recipe)
  pipeline         config -> the iterator the training loop calls
  tokenizer_cache  the run's tokenizer: given, or trained on the sources on first use
  corpus, books, sft_demo  bundled data: the interpreter's own sources and docs, generated chats
"""

from llama_jax.data.config import default_config, source
from llama_jax.data.errors import DataError
from llama_jax.data.pipeline import DataIterator, count_batches, make_iterator, resolve_sources, resume_state
from llama_jax.data.tokenizer_cache import ensure_tokenizer

__all__ = ["DataError", "DataIterator", "count_batches", "default_config", "ensure_tokenizer",
           "make_iterator", "resolve_sources", "resume_state", "source"]
