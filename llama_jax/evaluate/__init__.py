"""Evaluation: perplexity, zero/few-shot multiple choice and model comparison.

  python -m llama_jax.evaluate perplexity --model PATH --data FILE [--seq_len N --stride S]
  python -m llama_jax.evaluate choice --model PATH --data FILE.jsonl [--shots K --seed S]

Modules: `scoring` (batched, jitted log-likelihoods), `perplexity`, `choice`, `data` (files and
their errors), `table`, and `lm_eval_harness`, the EleutherAI lm-evaluation-harness model behind
the `llama-jax-lm-eval` command. This package imports nothing heavy, so the command line checks its
data before JAX starts.
"""

from llama_jax.evaluate.data import EvalDataError, Example, read_choices, read_text

__all__ = ["EvalDataError", "Example", "read_choices", "read_text"]
