"""A preference task a program can check, for the alignment demo (`configs/align_*_tiny.py`,
`reward_tiny.py`, `dpo_tiny.py`, `ppo_tiny.py`): name a thing of a kind, in the letter case the
request asks for.

  "Name a fruit in capital letters."            MANGO   (the requested form: preferred)
  "Name a fruit in small letters."              mango
  "Name a fruit with a capital first letter."   Mango
`follows(prompt, answer)` says whether an answer is a word of the kind in the requested form.

Sources (`data.source("demo:letters_prefs", ...)`), written once into the cache directory like
`sft_demo`'s (no download):
  letters_text     plain text for pretraining: the words in their three forms, and chats whose
                   answers take a random form
  letters_chat     ShareGPT conversations: the requests answered in a random one of the three
                   forms (SFT data of mixed quality: a model tuned on it follows about a third)
  letters_prefs    preference records {"prompt", "chosen", "rejected"}: a word of the kind in the
                   requested form against the same word in another form (3 in 5), a word of
                   another kind or a cut-off word in the requested form (1 in 5 each), so that a
                   reward model learns what a valid answer is, not only its letter case
  letters_prompts  prompt records {"prompt"} for PPO
"""

from __future__ import annotations

import os
import random

from llama_jax.data import corpus
from llama_jax.data.conversations import plain_text
from llama_jax.data.errors import DataError
from llama_jax.data.records import write_jsonl_once

NAMES = ("letters_text", "letters_chat", "letters_prefs", "letters_prompts")
VERSION = 2  # part of the file names: bump when what is written changes

KINDS = {
  "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum"),
  "color": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "pink"),
  "animal": ("cat", "dog", "horse", "mouse", "tiger", "zebra", "camel", "sheep", "goat", "rabbit"),
  "tree": ("oak", "pine", "maple", "birch", "cedar", "willow", "palm", "elm", "ash", "spruce"),
  "metal": ("iron", "gold", "silver", "copper", "tin", "lead", "zinc", "nickel", "steel", "bronze"),
  "bird": ("robin", "eagle", "crow", "owl", "swan", "duck", "hawk", "dove", "parrot", "finch"),
}
FORMS = {  # how the request names the form -> the form of a word
  "in capital letters": str.upper,
  "in small letters": str.lower,
  "with a capital first letter": str.capitalize,
}
REQUESTS = ("Name {a_kind} {form}.", "Give me one {kind}, written {form}.", "Tell me {a_kind} {form}.",
            "Which {kind} do you like? Answer {form}.")


def format_request(template: str, kind: str, form: str) -> str:
  """One of REQUESTS for a kind and a form phrase."""
  a_kind = ("an " if kind[0] in "aeiou" else "a ") + kind
  return template.format(kind=kind, a_kind=a_kind, form=form)


def request(rng: random.Random) -> tuple[str, str, str]:
  """(prompt, kind, form phrase) of a random request."""
  kind, form = rng.choice(sorted(KINDS)), rng.choice(sorted(FORMS))
  return format_request(rng.choice(REQUESTS), kind, form), kind, form


def parse_request(prompt: str) -> tuple[str, str] | None:
  """(kind, form phrase) a prompt asks for, or None when it is not one of the task's requests."""
  for template in REQUESTS:
    for kind in KINDS:
      for form in FORMS:
        if format_request(template, kind, form) == prompt.strip():
          return kind, form
  return None


def follows(prompt: str, answer: str) -> bool:
  """Whether `answer` is a word of the requested kind, in the requested form."""
  asked = parse_request(prompt)
  if asked is None:
    raise ValueError(f"not a request of the letters task: {prompt!r}")
  kind, form = asked
  word = answer.strip()
  return word.lower() in KINDS[kind] and word == FORMS[form](word.lower())


def _answer(rng: random.Random, kind: str, form: str | None = None) -> str:
  word = rng.choice(KINDS[kind])
  return FORMS[form or rng.choice(sorted(FORMS))](word)


def _rejected(rng: random.Random, word: str, kind: str, form: str) -> str:
  """An answer that does not follow the request."""
  draw = rng.random()
  if draw < 0.6:
    return FORMS[rng.choice([f for f in sorted(FORMS) if FORMS[f](word) != FORMS[form](word)])](word)
  if draw < 0.8:
    return FORMS[form](rng.choice(KINDS[rng.choice([k for k in sorted(KINDS) if k != kind])]))
  cuts = [word[:n] for n in range(1, len(word)) if word[:n] not in KINDS[kind]]
  return FORMS[form](rng.choice(cuts))


def records(name: str, seed: int = 0, n: int = 4000) -> list[dict]:
  rng = random.Random(f"{name}-{seed}")
  out = []
  for _ in range(n):
    prompt, kind, form = request(rng)
    if name == "letters_prompts":
      out.append({"prompt": prompt})
    elif name == "letters_prefs":
      word = rng.choice(KINDS[kind])
      out.append({"prompt": prompt, "chosen": FORMS[form](word), "rejected": _rejected(rng, word, kind, form)})
    elif name == "letters_chat":
      out.append({"conversations": [{"from": "human", "value": prompt},
                     {"from": "gpt", "value": _answer(rng, kind)}]})
    else:  # letters_text: what the words are, in every form, then a few chats as plain text
      word = rng.choice(KINDS[kind])
      facts = " ".join(f"{word.capitalize()} is a {kind}; {phrase}: {f(word)}."
              for phrase, f in FORMS.items())
      chats = [plain_text([{"role": "user", "content": prompt},
                           {"role": "assistant", "content": _answer(rng, kind)}])]
      out.append({"text": "\n".join([facts] + chats)})
  return out


def resolve(name: str, cache_dir: str = "") -> str:
  """The path of demo file `name`, written into the cache directory on first use."""
  if name not in NAMES:
    raise DataError(f"no demo source 'demo:{name}'")
  directory = os.path.join(os.path.expanduser(cache_dir or corpus.default_cache_dir()), "preference_demo")
  return write_jsonl_once(os.path.join(directory, f"{name}-v{VERSION}.jsonl"), lambda: records(name))
