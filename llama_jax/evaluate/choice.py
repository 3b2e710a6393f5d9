"""Zero- and few-shot multiple choice, the protocol of the LLaMA paper (Touvron et al. 2023, sec. 3)
as lm-eval-harness implements it.

Each choice is scored by its log-likelihood given the context: `acc` picks the highest, `acc_norm`
the highest log-likelihood divided by the choice's length in characters. A choice is appended to
the context verbatim, so it carries its own separating space (" Paris"); the length leaves that
one space out, as lm-eval-harness's does (its choices come without their target delimiter).
K-shot prepends K other examples of the same file, each its context and correct choice,
separated by a blank line (lm-eval-harness's default fewshot delimiter).

Tokenisation follows lm-eval-harness's `TemplateLM._encode_pair` for causal models: trailing
whitespace of the context moves to the continuation; the context is encoded alone, and the
continuation's tokens are those of context + continuation encoded whole, past the context's
length. Encoding whole keeps SentencePiece from seeing the continuation as the start of a text (it
would add a dummy-prefix space to " Paris"). Unlike lm-eval-harness's default for LLaMA, both
encodings start with BOS, as in LLaMA's training.

A context and choice longer than the model's max_seq_len + 1 tokens keep their last max_seq_len + 1
(the context loses its beginning), as lm-eval-harness's HF model truncates; a choice that alone
does not fit is an error (`scoring.truncate`). No position beyond max_seq_len is ever scored.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from llama_jax.evaluate import scoring
from llama_jax.evaluate.data import EvalDataError, Example, read_choices
from llama_jax.evaluate.scoring import Request

FEWSHOT_DELIMITER = "\n\n"


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context tokens with BOS, continuation tokens): the context encoded alone, the continuation
  the whole's tokens past as many (lm-eval's `_encode_pair`; where a piece spans the boundary the
  two differ from the whole's split). An empty continuation has no tokens."""
  if not continuation:
    return tokenizer.encode(context, bos=True), []
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  whole = tokenizer.encode(context + continuation, bos=True)
  context_ids = tokenizer.encode(context, bos=True)
  if len(context_ids) >= len(whole):
    # A continuation that merges into the context's last piece would score nothing (lm-eval fails
    # on it); score the whole's last token instead, which holds the continuation's characters.
    return whole[:-1], whole[-1:]
  return context_ids, whole[len(context_ids):]


def request(tokenizer, context: str, continuation: str) -> Request:
  ctx, cont = encode_pair(tokenizer, context, continuation)
  return Request(ctx + cont, len(ctx))


def fewshot_contexts(examples: Sequence[Example], shots: int, seed: int) -> list[str]:
  """Each example's context after `shots` other examples drawn with a generator seeded by
  (seed, index), so an example's prompt does not depend on the order of evaluation."""
  if shots == 0:
    return [e.context for e in examples]
  contexts = []
  for i, example in enumerate(examples):
    rng = np.random.default_rng((seed, i))
    others = np.delete(np.arange(len(examples)), i)
    picked = rng.choice(others, size=shots, replace=False)
    demos = [examples[j].context + examples[j].choices[examples[j].label] for j in picked]
    contexts.append(FEWSHOT_DELIMITER.join(demos + [example.context]))
  return contexts


def choice_logprobs(config, params: Any, tokenizer, contexts: Sequence[str],
                    examples: Sequence[Example], batch_size: int = 8,
                    progress: bool = True) -> list[list[float]]:
  """Log-likelihood of every choice of every example given its (few-shot) context."""
  requests, owners = [], []
  for i, (context, example) in enumerate(zip(contexts, examples)):
    for choice in example.choices:
      requests.append(request(tokenizer, context, choice))
      owners.append(i)
  scores = scoring.score(config, params, requests, batch_size=batch_size, pad_id=tokenizer.pad_id,
                         desc="choices", progress=progress)
  out: list[list[float]] = [[] for _ in examples]
  for owner, s in zip(owners, scores):
    out[owner].append(s.logprob)
  return out


def accuracy(examples: Sequence[Example], logprobs: Sequence[Sequence[float]]) -> dict[str, float | int]:
  acc = acc_norm = 0
  for example, lls in zip(examples, logprobs):
    lls = np.asarray(lls)
    lengths = np.asarray([max(1, len(c.removeprefix(" "))) for c in example.choices], np.float64)
    acc += int(np.argmax(lls) == example.label)
    acc_norm += int(np.argmax(lls / lengths) == example.label)
  n = len(examples)
  return {"acc": acc / n, "acc_norm": acc_norm / n, "examples": n}


def choice_file(model, path: str, shots: int = 0, seed: int = 0, batch_size: int = 8,
                progress: bool = True) -> dict[str, float | int]:
  """acc and acc_norm of a llama_jax.Model on a multiple-choice .jsonl file."""
  examples = read_choices(path)
  if shots < 0:
    raise EvalDataError(path, f"--shots must be non-negative, got {shots}")
  if shots >= len(examples):
    raise EvalDataError(path, f"{shots}-shot needs at least {shots + 1} examples, the file has {len(examples)}")
  contexts = fewshot_contexts(examples, shots, seed)
  logprobs = choice_logprobs(model.config, model.params, model.tokenizer, contexts, examples,
                             batch_size, progress)
  return accuracy(examples, logprobs)
