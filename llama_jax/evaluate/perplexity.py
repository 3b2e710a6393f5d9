"""Perplexity with a strided sliding window, the method of the transformers guide "Perplexity of
fixed-length models" (https://huggingface.co/docs/transformers/perplexity).

The text is encoded once, with one BOS at the start (LLaMA saw BOS at the start of every training
document; it is context, never scored). Windows of `seq_len` tokens start every `stride` tokens; a
window scores the tokens no earlier window scored, each given the window's tokens before it, and
the last window ends at the end of the text. So with stride == seq_len the windows are disjoint
and each window's first token is context only (as in the guide); with stride < seq_len every token
after BOS is scored exactly once, with at least seq_len - stride tokens of context.

The guide counts `num_valid_tokens - 1` scored tokens in every window, one too few in windows whose
first label is already masked (stride < seq_len); here each scored token is counted exactly.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from llama_jax.evaluate import scoring
from llama_jax.evaluate.data import EvalDataError, read_text
from llama_jax.evaluate.scoring import Request


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
  """(begin, end, first scored index) of each window over a sequence of n_tokens."""
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2, got {seq_len}")
  if not 1 <= stride <= seq_len:
    raise ValueError(f"stride must lie in [1, seq_len={seq_len}], got {stride}")
  out, prev_end = [], 0
  for begin in range(0, n_tokens, stride):
    end = min(begin + seq_len, n_tokens)
    first = max(prev_end, begin + 1)
    if first < end:
      out.append((begin, end, first))
    prev_end = end
    if end == n_tokens:
      break
  return out


def perplexity_of_tokens(config, params: Any, tokens: Sequence[int], seq_len: int | None = None,
                         stride: int | None = None, batch_size: int = 8, progress: bool = True,
                         pad_id: int = 0) -> dict[str, float | int]:
  """{"perplexity", "nll" (mean natural-log NLL per scored token), "tokens" (scored)}. seq_len:
  at most and by default the model's max_seq_len; stride: by default seq_len."""
  # `is None`: 0 is a bad value (windows() refuses it), not "the default".
  seq_len = config.max_seq_len if seq_len is None else seq_len
  stride = seq_len if stride is None else stride
  if seq_len > config.max_seq_len:  # positions the model never trained on: generate refuses them too
    raise ValueError(f"seq_len {seq_len} is longer than the model's context of {config.max_seq_len} tokens "
                     "(its max_seq_len)")
  if len(tokens) < 2:
    raise ValueError(f"perplexity needs at least 2 tokens, got {len(tokens)}")
  requests = [Request(list(tokens[b:e]), f - b) for b, e, f in windows(len(tokens), seq_len, stride)]
  scores = scoring.score(config, params, requests, batch_size=batch_size, max_len=seq_len,
                         pad_id=pad_id, desc="perplexity", progress=progress)
  count = sum(s.count for s in scores)
  nll = -sum(s.logprob for s in scores) / count
  return {"perplexity": math.exp(nll), "nll": nll, "tokens": count}


def perplexity(model, text: str, seq_len: int | None = None, stride: int | None = None,
               batch_size: int = 8, progress: bool = True) -> dict[str, float | int]:
  """Perplexity of `text` under a llama_jax.Model (which must carry its tokenizer)."""
  tokens = model.tokenizer.encode(text, bos=True)
  return perplexity_of_tokens(model.config, model.params, tokens, seq_len, stride, batch_size,
                              progress, pad_id=model.tokenizer.pad_id)


def perplexity_file(model, path: str, seq_len: int | None = None, stride: int | None = None,
                    batch_size: int = 8, progress: bool = True) -> dict[str, float | int]:
  """Perplexity of a .txt or .jsonl file (see data.read_text)."""
  tokens = model.tokenizer.encode(read_text(path), bos=True)
  if len(tokens) < 2:
    raise EvalDataError(path, f"the text encodes to {len(tokens)} token(s) with BOS; perplexity needs 2")
  return perplexity_of_tokens(model.config, model.params, tokens, seq_len, stride, batch_size,
                              progress, pad_id=model.tokenizer.pad_id)
