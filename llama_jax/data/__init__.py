"""Pretraining data: weighted mixtures of streamed text sources, sentencepiece, packing, a resumable
prefetching iterator, and the embedded default corpus (see `pipeline` for the contract)."""

from llama_jax.data.config import default_config, source
from llama_jax.data.errors import DataError
from llama_jax.data.pipeline import DataIterator, make_iterator, resolve_sources
from llama_jax.data.tokenizer_cache import ensure_tokenizer

__all__ = ["DataError", "DataIterator", "default_config", "ensure_tokenizer", "make_iterator",
           "resolve_sources", "source"]
