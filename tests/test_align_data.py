"""Preference and prompt data (llama_jax.align.data): the three record layouts give the same rows,
only the response's tokens count (checked against an independent encoding of the Vicuna template),
bad records are counted and skipped or an error, prompts, resume, count_batches, the held-out
split; and the letters demo task's checker."""

import json
import random

import numpy as np
import pytest

from llama_jax import data
from llama_jax.align import data as align_data
from llama_jax.data import preference_demo
from llama_jax.data.errors import DataError
from llama_jax.tokenizer import Tokenizer, chat
from llama_jax.tokenizer import train as sp_train

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
WORDS = "what is the color of sky sea grass blue green red name a fruit apple pear yes no maybe".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  rng = random.Random(0)
  template = chat.get_template()
  texts = [template.render([{"role": "user", "content": " ".join(rng.choices(WORDS, k=6)) + "?"},
                            {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=5)) + "."}])
           .replace("</s>", "\n") for _ in range(400)]
  return Tokenizer(sp_train.train(texts, 300, str(tmp_path_factory.mktemp("tok") / "tok"), num_threads=1))


def cfg(path, **overrides):
  c = data.default_config()
  c.sources = {"pairs": data.source(str(path), 1.0, epochs=1)}
  c.holdout_every = 0
  c.prefetch = 1
  c.num_threads = 1
  for k, v in overrides.items():
    c[k] = v
  return c


def write(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return path


L = 256  # tokens of a row: the system line alone is ~150 with this small vocabulary


def batches(tok, path, kind="pairs", length=L, rows=2, **overrides):
  it = align_data.make_iterator(cfg(path, **overrides), tok, kind, length=length, global_batch_size=rows)
  return list(it), it


def expected(tok, turns, answer):
  """BOS, the Vicuna rendering of the user/assistant turns and the answer, each prompt and answer
  piece tokenised on its own (SentencePiece splits at whitespace), with 1 on the answer's tokens."""
  ids, mask = [tok.bos_id], [0]
  text = SYSTEM + " "
  for k, (role, content) in enumerate(turns):
    if role == "user":
      text += f"USER: {content} "
    else:
      ids += tok.sp.encode(text + "ASSISTANT:") + tok.sp.encode(content) + [tok.eos_id]
      text = ""
  prompt = tok.sp.encode(text + "ASSISTANT:")
  ids += prompt
  mask = [0] * len(ids)
  response = tok.sp.encode(answer) + [tok.eos_id]
  return ids + response, mask + [1] * len(response)


def test_only_the_response_counts_in_every_layout(tmp_path, tok):
  q, good, bad = "what is the color of sky?", "blue.", "green grass."
  records = [
      {"prompt": q, "chosen": good, "rejected": bad},
      {"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
       "rejected": [{"from": "human", "value": q}, {"from": "gpt", "value": bad}]},
      {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
       "rejected": [{"role": "assistant", "content": bad}]},
  ]
  got, _ = batches(tok, write(tmp_path / "p.jsonl", records), rows=3)
  (b,) = got
  for side, answer in (("chosen", good), ("rejected", bad)):
    ids, mask = expected(tok, [("user", q)], answer)
    for row in range(3):
      np.testing.assert_array_equal(b[side][row, :len(ids)], ids)
      np.testing.assert_array_equal(b[side][row, len(ids):], tok.pad_id)
      np.testing.assert_array_equal(b[side + "_mask"][row], np.pad(mask, (0, L - len(mask))))
  assert tok.decode([t for t, m in zip(b["chosen"][0], b["chosen_mask"][0]) if m and t != tok.eos_id]) == good


def test_multi_turn_pairs_count_only_the_answers_after_the_shared_prefix(tmp_path, tok):
  shared = [{"role": "user", "content": "name a fruit."}, {"role": "assistant", "content": "apple."},
            {"role": "user", "content": "and a color?"}]
  record = {"chosen": shared + [{"role": "assistant", "content": "red."}],
            "rejected": shared + [{"role": "assistant", "content": "pear."}]}
  (b,), _ = batches(tok, write(tmp_path / "p.jsonl", [record]), rows=1)
  turns = [("user", "name a fruit."), ("assistant", "apple."), ("user", "and a color?")]
  ids, mask = expected(tok, turns, "red.")
  np.testing.assert_array_equal(b["chosen"][0, :len(ids)], ids)
  np.testing.assert_array_equal(b["chosen_mask"][0, :len(ids)], mask)  # "apple." does not count
  assert b["chosen_mask"][0].sum() == len(tok.sp.encode("red.")) + 1


BAD = [
    ("not json", "not JSON"),
    ({"prompt": "a", "chosen": "yes."}, "no 'rejected' field"),
    ({"chosen": "yes.", "rejected": "no."}, "no 'prompt' field"),
    ({"prompt": "red?", "chosen": "yes.", "rejected": "yes."}, "are the same"),
    ({"prompt": "red?", "chosen": "  ", "rejected": "no."}, "empty 'chosen' response"),
    ({"prompt": "red?", "chosen": "yes.", "rejected": ["no."]}, "both be strings or both be lists"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
     "share their turns up to a user turn"),
    ({"prompt": "red " * 200, "chosen": "yes.", "rejected": "no."}, "more than the window"),
]


def test_bad_records_are_counted_and_skipped_or_an_error(tmp_path, tok, caplog):
  good = {"prompt": "red?", "chosen": "yes.", "rejected": "no."}
  path = write(tmp_path / "p.jsonl", [good] + [r for r, _ in BAD] + [good])
  got, it = batches(tok, path, rows=2)
  assert len(got) == 1 and got[0]["chosen_mask"].sum(axis=1).min() > 0  # the two good pairs
  assert it.bad_records() == {"pairs": len(BAD)}
  for line, (_, reason) in enumerate(BAD, start=2):
    assert any(f"p.jsonl:{line}: " in m and reason in m for m in caplog.messages), reason
  with pytest.raises(DataError, match=r"p.jsonl:2: not JSON"):
    batches(tok, path, on_bad_record="error")


def test_last_batch_is_completed_with_empty_rows(tmp_path, tok):
  path = write(tmp_path / "p.jsonl", [{"prompt": f"{w}?", "chosen": "yes.", "rejected": "no."} for w in WORDS[:5]])
  got, _ = batches(tok, path, rows=2)
  assert len(got) == 3
  assert got[-1]["chosen_mask"][1].sum() == 0 and got[-1]["rejected"][1].tolist() == [tok.pad_id] * L
  assert align_data.count_batches(cfg(path), tok, "pairs", length=L, global_batch_size=2) == 3


def test_prompts_end_with_the_generation_prompt(tmp_path, tok):
  records = [{"prompt": "what is the color of sky?"},
             {"prompt": [{"role": "user", "content": "name a fruit."}, {"role": "assistant", "content": "apple."},
                         {"role": "user", "content": "and a color?"}]},
             {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
             {"prompt": "red " * 200}]
  got, it = batches(tok, write(tmp_path / "p.jsonl", records), kind="prompts", rows=2)
  (b,) = got
  template = chat.get_template()
  for row, messages in enumerate([[{"role": "user", "content": "what is the color of sky?"}],
                                  records[1]["prompt"]]):
    ids = template.encode_prompt(messages, tok)
    assert ids[-1] == tok.sp.encode("ASSISTANT:")[-1]
    np.testing.assert_array_equal(b["prompt"][row, :len(ids)], ids)
    np.testing.assert_array_equal(b["prompt_mask"][row], np.arange(L) < len(ids))
  assert it.bad_records() == {"pairs": 2}  # a prompt ending with the answer, one too long


def test_resume_mid_epoch_gives_the_same_batches(tmp_path, tok):
  rng = random.Random(3)
  records = [{"prompt": " ".join(rng.choices(WORDS, k=4)) + "?", "chosen": rng.choice(WORDS) + ".",
              "rejected": rng.choice(WORDS) + " " + rng.choice(WORDS) + "."} for _ in range(40)]
  path = write(tmp_path / "p.jsonl", records)
  c = cfg(path, chunk_chars=64)  # several chunks: the state points into the middle of one
  c.sources.pairs.epochs = 2
  straight = list(align_data.make_iterator(c, tok, "pairs", length=L, global_batch_size=3))
  it = align_data.make_iterator(c, tok, "pairs", length=L, global_batch_size=3)
  head = [next(it) for _ in range(7)]
  state = json.loads(json.dumps(it.get_state()))
  resumed = align_data.make_iterator(c, tok, "pairs", length=L, global_batch_size=3)
  resumed.set_state(state)
  rest = list(resumed)
  assert len(head) + len(rest) == len(straight) == 27
  for a, b in zip(head + rest, straight):
    for k in align_data.PAIR_FIELDS:
      np.testing.assert_array_equal(a[k], b[k])


def test_held_out_pairs_are_never_trained_on(tmp_path, tok):
  records = [{"prompt": f"{w} {v}?", "chosen": "yes.", "rejected": "no."} for w in WORDS for v in WORDS[:3]]
  path = write(tmp_path / "p.jsonl", records)
  rows = {}
  for split in ("train", "eval"):
    c = cfg(path, holdout_every=5, eval_batches=40)
    it = align_data.make_iterator(c, tok, "pairs", length=L, global_batch_size=1, split=split)
    rows[split] = {tuple(b["chosen"][0]) for b in it}  # eval: its sources repeat; 40 batches
  assert len(rows["train"]) + len(rows["eval"]) == len(records)
  assert len(rows["eval"]) in (len(records) // 5, len(records) // 5 + 1)
  assert not rows["train"] & rows["eval"]


def test_letters_task_checker():
  assert preference_demo.follows("Name a fruit in capital letters.", "MANGO")
  assert preference_demo.follows("Tell me an animal with a capital first letter.", " Zebra")
  assert not preference_demo.follows("Name a fruit in capital letters.", "Mango")
  assert not preference_demo.follows("Name a fruit in small letters.", "red")  # not a fruit
  with pytest.raises(ValueError, match="not a request"):
    preference_demo.follows("Hello", "hi")
  for record in preference_demo.records("letters_prefs", n=50):
    assert preference_demo.follows(record["prompt"], record["chosen"])
    assert not preference_demo.follows(record["prompt"], record["rejected"])


def test_answers_the_template_renders_alike_are_refused(tok):
  # llama-2's template trims each turn: "blue" and " blue " are one answer once rendered.
  template = chat.get_template("llama-2")
  pair = {"prompt": "red?", "chosen": "blue", "rejected": " blue "}
  with pytest.raises(align_data.BadRecord, match="once the template renders them"):
    align_data.encode_pair(pair, template, tok, 512)
  align_data.encode_pair({**pair, "rejected": "green"}, template, tok, 512)
