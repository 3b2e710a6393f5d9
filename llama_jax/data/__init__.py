"""Pretraining and fine-tuning data: weighted mixtures of streamed text or conversation sources,
sentencepiece, packing, a resumable prefetching iterator, and the embedded default corpus (see
`pipeline` for the contract, `sft` for conversations)."""

from llama_jax.data.config import default_config, source
from llama_jax.data.errors import DataError
from llama_jax.data.pipeline import DataIterator, count_batches, make_iterator, resolve_sources
from llama_jax.data.tokenizer_cache import ensure_tokenizer

__all__ = ["DataError", "DataIterator", "count_batches", "default_config", "ensure_tokenizer",
           "make_iterator", "resolve_sources", "source"]
