"""The alignment demo's measure: the share of a model's greedy answers to the letters task's
requests (`data.preference_demo`) that take the requested form, over every request the task has
(6 kinds x 3 forms x 4 phrasings), rendered with the chat template the demo trains with.

  python -m llama_jax.align check --model runs/letters_sft --model runs/letters_dpo
"""

from __future__ import annotations

import itertools

from llama_jax.data import preference_demo as task
from llama_jax.generate import generate_tokens
from llama_jax.tokenizer import chat


def all_requests() -> list[str]:
  return [task.format_request(t, kind, form)
          for t, kind, form in itertools.product(task.REQUESTS, sorted(task.KINDS), sorted(task.FORMS))]


def greedy_answers(model, prompts: list[str], template: str = "vicuna_v1.1", max_new_tokens: int = 8) -> list[str]:
  """Each prompt as one user turn, answered greedily, as text (without the EOS)."""
  tok = model.tokenizer
  rendering = chat.template_for(tok, template)
  ids = [rendering.encode_prompt([{"role": "user", "content": p}], tok) for p in prompts]
  new = generate_tokens(model.config, model.params, ids, max_new_tokens, eos_ids=tok.eos_ids, mesh=model.mesh,
                        rules=model.rules)
  return [tok.decode_continuation(i, [t for t in n if t not in tok.eos_ids]) for i, n in zip(ids, new)]


def preferred_share(model, template: str = "vicuna_v1.1") -> tuple[float, list[tuple[str, str, bool]]]:
  """(share of requests answered in the requested form, (prompt, answer, follows) per request)."""
  prompts = all_requests()
  answers = greedy_answers(model, prompts, template)
  rows = [(p, a, task.follows(p, a)) for p, a in zip(prompts, answers)]
  return sum(r[2] for r in rows) / len(rows), rows
