"""Supervised chat fine-tuning (llama_jax.data.sft): the answer-only loss mask token by token,
splitting at turn boundaries, truncation and bad records counted, both record formats,
count_batches, exact resume, and a tiny model fine-tuned by the real trainer that then answers
its conversations word for word through `generate.py --chat`."""

import io
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import xla_flags

from llama_jax import data
from llama_jax.tokenizer import chat
from llama_jax.data import sft
from llama_jax.tokenizer import Tokenizer
from llama_jax.tokenizer import train as sp_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# FastChat's vicuna_v1.1 system line, written out here rather than taken from llama_jax.tokenizer.chat.
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
WORDS = ("what is the color of sky sea grass blue green red name a fruit apple pear count to one two "
         "three say hello my friend good morning how are you i am fine thanks tell me about cats dogs "
         "they are small animals that like to sleep play run").split()

# The end-to-end test's conversations: learned word for word.
CHATS = [
    [("What is the color of the sky?", "The sky is blue.")],
    [("Name a fruit.", "An apple is a fruit."), ("What color is it?", "It is red or green.")],
    [("Say hello.", "Hello, my friend.")],
    [("Count to three.", "One, two, three.")],
]


def sharegpt(pairs, system=None):
  turns = [{"from": "system", "value": system}] if system is not None else []
  for q, a in pairs:
    turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  return {"conversations": turns}


def random_pairs(rng, n_pairs, max_words=12):
  return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) + "?",
           " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) + ".")
          for _ in range(n_pairs)]


def write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  rng = random.Random(0)
  template = chat.get_template()
  convs = [[(q, a) for q, a in pairs] for pairs in CHATS] * 20
  convs += [random_pairs(rng, rng.randint(1, 3)) for _ in range(300)]
  texts = [template.render([m for q, a in c for m in ({"role": "user", "content": q},
                                                        {"role": "assistant", "content": a})])
           .replace("</s>", "\n") for c in convs]
  prefix = str(tmp_path_factory.mktemp("tok") / "tok")
  return Tokenizer(sp_train.train(texts, 400, prefix, num_threads=1))


def config(sources, **overrides):
  cfg = data.default_config()
  cfg.sources = sources
  cfg.holdout_every = 0
  cfg.prefetch = 2
  cfg.num_threads = 1
  cfg.document_attention = True
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def expected_vicuna(tok, pairs):
  """Ids and answer mask of a Vicuna v1.1 conversation, from the template's text: each
  "USER: q ASSISTANT:" prompt and each answer tokenised on its own (SentencePiece splits at
  whitespace, so the answer's word-start "▁" is the space after "ASSISTANT:"), EOS after answers."""
  ids, mask = [tok.bos_id], [False]
  for k, (q, a) in enumerate(pairs):
    prompt = tok.sp.encode((SYSTEM + " " if k == 0 else "") + f"USER: {q} ASSISTANT:")
    answer = tok.sp.encode(a) + [tok.eos_id]
    ids += prompt + answer
    mask += [False] * len(prompt) + [True] * len(answer)
  return ids, mask


def one_window(tmp_path, tok, record, ids):
  """The batch of a source holding one conversation that is exactly one window (seq_len + 1
  tokens: nothing split, nothing truncated); its inputs and targets are `ids`, shifted."""
  path = write_jsonl(tmp_path / "c.jsonl", [record])
  cfg = config({"chat": data.source(path, 1.0, epochs=1, format="sharegpt")})
  batches = list(data.make_iterator(cfg, tok, seq_len=len(ids) - 1, global_batch_size=1))
  assert len(batches) == 1
  np.testing.assert_array_equal(batches[0]["inputs"][0], ids[:-1])
  np.testing.assert_array_equal(batches[0]["targets"][0], ids[1:])
  return batches[0]


def test_mask_covers_exactly_the_assistant_tokens(tmp_path, tok):
  pairs = [("Good morning, how are you?", "I am fine, thanks!"),
           ("Tell me about cats.", "They are small animals that like to sleep."),
           ("Say omega.", "Ω is omega.")]
  ids, mask = expected_vicuna(tok, pairs)
  assert sum(mask) > 10 and len(ids) - sum(mask) > 20
  # "Ω" is not in the vocabulary: the space before it is a token of its own, and it counts (the
  # generation prompt ends at "ASSISTANT:", so the model has to produce that space).
  assert tok.sp.id_to_piece(tok.sp.encode("Ω is omega.")[0]) == "\u2581"
  b = one_window(tmp_path, tok, sharegpt(pairs), ids)
  np.testing.assert_array_equal(b["loss_mask"][0], np.array(mask[1:], np.float32))  # shifted: targets
  np.testing.assert_array_equal(b["segment_ids"][0], 1)
  np.testing.assert_array_equal(b["positions"][0], np.arange(len(ids) - 1))
  answers = tok.decode([t for t, m in zip(b["targets"][0], b["loss_mask"][0]) if m and t != tok.eos_id])
  assert answers == "I am fine, thanks! They are small animals that like to sleep. Ω is omega."


def test_several_conversations_per_window_keep_their_masks(tmp_path, tok):
  rng = random.Random(1)
  convs = [random_pairs(rng, rng.randint(1, 2), 5) for _ in range(12)]
  path = write_jsonl(tmp_path / "c.jsonl", [sharegpt(c) for c in convs])
  cfg = config({"chat": data.source(path, 1.0, epochs=1, format="sharegpt")})
  seq_len, rows = 160, 2
  got = list(data.make_iterator(cfg, tok, seq_len=seq_len, global_batch_size=rows))
  # Independently: whole conversations in order, a window closed when the next one does not fit,
  # padded with EOS (not counted, segment 0); the last batch completed with padding rows.
  windows, current = [], []
  for c in convs:
    doc = expected_vicuna(tok, c)
    if sum(len(d[0]) for d in current) + len(doc[0]) > seq_len + 1:
      windows.append(current)
      current = []
    current.append(doc)
  windows.append(current)
  windows += [[]] * (-len(windows) % rows)
  tokens = np.full((len(windows), seq_len + 1), tok.eos_id)
  counted = np.zeros((len(windows), seq_len + 1))
  segment = np.zeros((len(windows), seq_len + 1), int)
  for r, docs in enumerate(windows):
    ids = [t for d in docs for t in d[0]]
    tokens[r, :len(ids)] = ids
    counted[r, :len(ids)] = [m for d in docs for m in d[1]]
    segment[r, :len(ids)] = [s + 1 for s, d in enumerate(docs) for _ in d[0]]
  # Several conversations per window, and windows closed early rather than cutting one.
  filled = [r for r, w in enumerate(windows) if w]
  assert max(len(w) for w in windows) >= 2 and any(segment[r, -1] == 0 for r in filled[:-1])
  expected = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": counted[:, 1:],
              "segment_ids": segment[:, :-1]}
  for key, value in expected.items():
    np.testing.assert_array_equal(np.concatenate([b[key] for b in got]), value, err_msg=key)


def test_splitting_at_turn_boundaries_never_cuts_a_keepable_turn(tok):
  template = chat.get_template()
  rng = random.Random(2)
  checked_splits = checked_truncations = 0
  for trial in range(30):
    pairs = random_pairs(rng, rng.randint(2, 6), 25)
    system = [{"role": "system", "content": "Be brief."}] if trial % 3 == 0 else []
    turns = [m for q, a in pairs
             for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    max_len = rng.choice([50, 70, 100, 140])

    def encode(a, b):
      return template.encode(system + turns[2 * a:2 * b], tok)[0]

    pieces = sft.split_conversation(template, system + turns, tok, max_len)
    assert pieces[0].turns[0] == 0 and pieces[-1].turns[1] == len(pairs)
    for p, q in zip(pieces, pieces[1:]):
      assert p.turns[1] == q.turns[0]  # contiguous: every turn in exactly one piece
    for p in pieces:
      a, b = p.turns
      whole = encode(a, b)
      assert len(p.ids) <= max_len and len(p.ids) == len(p.answer)
      if p.truncated:  # only a single turn that does not fit alone is cut
        assert b == a + 1 and len(whole) > max_len
        assert list(p.ids) == whole[:max_len]
        checked_truncations += 1
      else:  # a valid conversation of its own (system line included), as long as it can be
        assert list(p.ids) == whole
        assert b == len(pairs) or len(encode(a, b + 1)) > max_len
        checked_splits += len(pieces) > 1
  assert checked_splits > 5 and checked_truncations > 3


def test_long_turns_are_truncated_and_counted(tmp_path, tok, caplog):
  long = " ".join(["apple pear grass"] * 60) + "."
  records = [sharegpt([("Name a fruit.", "An apple.")]), sharegpt([("Say hello.", long)]),
             sharegpt([("Count to three.", "One, two, three."), ("Tell me about cats.", long)])]
  path = write_jsonl(tmp_path / "c.jsonl", records)
  cfg = config({"chat": data.source(path, 1.0, epochs=2, format="sharegpt")})
  it = data.make_iterator(cfg, tok, seq_len=96, global_batch_size=2)
  with caplog.at_level("WARNING"):
    batches = list(it)
  assert it.truncated_turns() == {"chat": 4}  # two turns, two epochs
  events = it.events()
  assert any(f"{path}:2" in e and "truncated" in e for e in events)
  assert any(f"{path}:3" in e and "turn 2" in e for e in events)
  assert any("truncated to seq_len + 1 tokens: chat=4" in e for e in events)
  assert f"{path}:2" in caplog.text
  # The truncated pieces fill their windows exactly and still teach the answer's beginning.
  full = [r for b in batches for r in range(len(b["inputs"])) if b["segment_ids"][r].min() == 1
          and b["loss_mask"][r, -1] == 1]
  assert len(full) == 4


def test_bad_records_are_skipped_with_file_and_line(tmp_path, tok, caplog):
  good = sharegpt([("Say hello.", "Hello, my friend.")])
  lines = [
      good,
      {"conversations": [{"from": "gpt", "value": "I start."}, {"from": "human", "value": "Hi"}]},
      {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep."}]},
      {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]},
      "not json",
      {"conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi?"}]},
      {"conversations": "Hi"},
      {"conversations": [{"from": "human", "value": "Only a question."}]},
      # Accepted: user/assistant roles, role/content keys, a trailing unanswered question.
      {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "Unanswered?"}]},
  ]
  path = write_jsonl(tmp_path / "c.jsonl", lines)
  cfg = config({"chat": data.source(path, 1.0, epochs=1, format="sharegpt")})
  it = data.make_iterator(cfg, tok, seq_len=64, global_batch_size=2)
  with caplog.at_level("WARNING"):
    batches = list(it)
  assert it.bad_records() == {"chat": 7}
  for line, reason in [(2, "starts with the assistant"), (3, "unknown role 'robot'"), (4, "empty turn"),
                       (5, "not JSON"), (6, "two user turns in a row"), (7, "no 'conversations' list"),
                       (8, "no assistant answer")]:
    assert any(f"{path}:{line}:" in r.message and reason in r.message for r in caplog.records), reason
  docs = [tok.decode(b["inputs"][r][b["segment_ids"][r] == s]) for b in batches
          for r in range(2) for s in range(1, b["segment_ids"][r].max() + 1)]
  assert len(docs) == 2 and "Unanswered" not in docs[1] and docs[1].endswith("USER: Hi ASSISTANT: Hello.")

  cfg.on_bad_record = "error"
  with pytest.raises(data.DataError, match=f"{path}:2: conversations\\[0\\]: the conversation starts"):
    list(data.make_iterator(cfg, tok, seq_len=64, global_batch_size=2))


def test_alpaca_records(tmp_path, tok):
  records = [{"instruction": "Name a fruit.", "input": "", "output": "An apple."},
             {"instruction": "Count to three.", "input": "one two", "output": "One, two, three."},
             {"instruction": "Say hello.", "output": "Hello."},
             {"instruction": "Say hello.", "input": "x"}]  # no output: bad
  path = write_jsonl(tmp_path / "a.jsonl", records)
  cfg = config({"tasks": data.source(path, 1.0, epochs=1, format="alpaca")})
  it = data.make_iterator(cfg, tok, seq_len=128, global_batch_size=3)
  b = next(it)
  texts = [tok.decode(b["inputs"][r][b["segment_ids"][r] == 1].tolist() + [int(b["targets"][r, -1])])
           for r in range(3)]
  users = ["Name a fruit.", "Count to three.\n\none two", "Say hello."]
  answers = ["An apple.", "One, two, three.", "Hello."]
  for text, user, answer in zip(texts, users, answers):
    assert text.startswith(f"{SYSTEM} USER: {user} ASSISTANT: {answer}")
  for r, answer in enumerate(answers):
    counted = [t for t, m in zip(b["targets"][r], b["loss_mask"][r]) if m]
    assert counted[-1] == tok.eos_id and tok.decode(counted[:-1]) == answer
  assert it.bad_records() == {"tasks": 1}


@pytest.mark.slow
def test_count_batches_equals_the_iterator(tmp_path, tok):
  rng = random.Random(3)
  chats = write_jsonl(tmp_path / "c.jsonl", [sharegpt(random_pairs(rng, rng.randint(1, 4)))
                                             for _ in range(40)])
  texts = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(rng.choice(WORDS) for _ in range(30))}
                                             for _ in range(30)])
  cfg = config({"chat": data.source(chats, 0.7, epochs=3, format="sharegpt"),
                "text": data.source(texts, 0.3, epochs=2)})
  for seq_len, batch in [(64, 4), (100, 3)]:
    n = data.count_batches(cfg, tok, seq_len=seq_len, global_batch_size=batch, seed=1)
    assert n == sum(1 for _ in data.make_iterator(cfg, tok, seq_len=seq_len, global_batch_size=batch, seed=1))
    assert n > 10
  # Several processes: each counts its own iterator's batches (its share of the records, or with
  # shard_by="replicated" the whole global batch); the loop trains the least of them.
  counts = {}
  for shard_by in ("records", "replicated"):
    cfg.shard_by = shard_by
    for p in range(2):
      kwargs = dict(seq_len=64, global_batch_size=4, seed=1, process_index=p, process_count=2)
      counts[shard_by, p] = data.count_batches(cfg, tok, **kwargs)
      assert counts[shard_by, p] == sum(1 for _ in data.make_iterator(cfg, tok, **kwargs))
  assert counts["replicated", 0] == counts["replicated", 1] == data.count_batches(
      cfg, tok, seq_len=64, global_batch_size=4, seed=1)
  cfg.sources.text.epochs = 0
  with pytest.raises(data.DataError, match="text: epochs is 0.*set num_steps"):
    data.count_batches(cfg, tok, seq_len=64, global_batch_size=4, seed=1)


def test_resume_mid_run_gives_the_same_batches(tmp_path, tok):
  rng = random.Random(4)
  path = write_jsonl(tmp_path / "c.jsonl", [sharegpt(random_pairs(rng, rng.randint(1, 4), 20))
                                            for _ in range(30)])
  cfg = config({"chat": data.source(path, 1.0, epochs=2, format="sharegpt")}, chunk_chars=300)
  straight_it = data.make_iterator(cfg, tok, seq_len=80, global_batch_size=2)
  straight = list(straight_it)
  it = data.make_iterator(cfg, tok, seq_len=80, global_batch_size=2)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  resumed = data.make_iterator(cfg, tok, seq_len=80, global_batch_size=2)
  resumed.set_state(state)
  rest = list(resumed)
  assert len(rest) == len(straight) - 7
  for a, b in zip(straight[7:], rest):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert resumed.truncated_turns() == straight_it.truncated_turns()  # the count is in the state
  assert straight_it.truncated_turns()["chat"] > 0


def test_unknown_template_and_container_are_data_errors(tmp_path, tok):
  path = write_jsonl(tmp_path / "c.jsonl", [sharegpt([("Hi", "Hello.")])])
  cfg = config({"chat": data.source(path, 1.0, epochs=1, format="sharegpt", template="nope")})
  with pytest.raises(data.DataError, match="chat.template: unknown chat template 'nope'"):
    data.make_iterator(cfg, tok, seq_len=64, global_batch_size=2)
  (tmp_path / "c.parquet").write_bytes(b"")
  cfg = config({"chat": data.source(str(tmp_path / "c.parquet"), 1.0, epochs=1, format="alpaca")})
  with pytest.raises(data.DataError, match="format 'alpaca' reads .jsonl"):
    data.make_iterator(cfg, tok, seq_len=64, global_batch_size=2)


@pytest.mark.slow
def test_fine_tuned_tiny_model_answers_word_for_word(tmp_path, tok):
  import flax.linen as nn
  import jax
  import llama_jax
  from llama_jax.config import ModelConfig
  from llama_jax.generate.cli import main as generate_main
  from llama_jax.model import init_params

  # A fresh random model exported as a Hugging Face checkpoint: the run fine-tunes it by
  # init_from and inherits its tokenizer.model (data.tokenizer is left empty).
  shape = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=400, max_seq_len=128)
  cfg = ModelConfig(**shape)
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  llama_jax.Model(cfg, params, tok).export_hf(str(tmp_path / "base"))
  path = write_jsonl(tmp_path / "chats.jsonl", [sharegpt(c) for c in CHATS])
  overrides = "\n".join(f"  config.model.{k} = {v!r}" for k, v in shape.items())
  (tmp_path / "cfg.py").write_text(textwrap.dedent(f"""\
      import ml_collections
      from configs import sft_tiny
      from llama_jax.data.config import source

      def get_config():
        config = sft_tiny.get_config()
        config.init_from = {str(tmp_path / 'base')!r}
        config.data.sources = ml_collections.ConfigDict(dict(
            chat=source({path!r}, 1.0, epochs=120, format="sharegpt")))
        config.data.prefetch = 1
        config.seq_len = 128  # every conversation whole (the longest is 104 tokens)
        config.batch_size = 4
        config.log_every = 20
        config.optimizer.lr = 1e-2
        config.mesh.fsdp = -1
      """) + overrides + "\n  return config\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  proc = subprocess.run([sys.executable, "train.py", f"--config={tmp_path / 'cfg.py'}",
                         f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  inherited = [(tmp_path / d / "tokenizer.model").read_bytes() for d in ("base", "run")]
  assert inherited[0] == inherited[1]
  rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  steps = data.count_batches(data_config_of(tmp_path / "run"), tok, seq_len=128, global_batch_size=4, seed=0)
  assert os.listdir(tmp_path / "run" / "checkpoints") == [str(steps)]
  assert rows[-1]["step"] == steps and rows[-1]["train/loss"] < 0.05 < rows[0]["train/loss"]

  # Greedy chat decoding through generate.py --chat, one conversation after another (/reset).
  lines = []
  for pairs in CHATS:
    lines += [q for q, _ in pairs] + ["/reset"]
  out = io.StringIO()
  code = generate_main(["--checkpoint", str(tmp_path / "run"), "--chat", "--temperature", "0",
                        "--max_new_tokens", "24"], stdin=io.StringIO("\n".join(lines) + "\n"), stdout=out)
  assert code == 0
  assert out.getvalue().splitlines() == [f"ASSISTANT: {a}" for pairs in CHATS for _, a in pairs]


def data_config_of(workdir):
  """The data block of a run, as train.py saved it."""
  import ml_collections
  saved = json.load(open(os.path.join(workdir, "config.json")))
  return ml_collections.ConfigDict(saved["data"])


def test_a_tokenizer_trains_on_conversation_sources(tmp_path):
  path = write_jsonl(tmp_path / "c.jsonl", [sharegpt(c) for c in CHATS * 30])
  cfg = config({"chat": data.source(path, 1.0, epochs=1, format="sharegpt")}, vocab_size=400,
               cache_dir=str(tmp_path / "cache"))
  tok = Tokenizer(data.ensure_tokenizer(cfg))
  # Trained on the rendered text (system line and role tags included), not on the JSON.
  pieces = {tok.sp.id_to_piece(i) for i in range(tok.vocab_size)}
  assert "▁ASSISTANT" in pieces and not any("conversations" in p or "gpt" in p for p in pieces)


def test_auto_template_is_the_models_own(tmp_path):
  # A tokenizer.json folder with a ChatML template: the source's default template ("auto") is the
  # model's own, so the ids are transformers' apply_chat_template's and the loss counts the answers
  # and the <|im_end|> after each.
  import transformers
  from conftest import write_hf_tokenizer

  from llama_jax.tokenizer import load_tokenizer
  folder = write_hf_tokenizer(tmp_path / "tok", "chatml")
  tok, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
  pairs = CHATS[1]
  messages = [{"role": "system", "content": "Be brief."}]
  for q, a in pairs:
    messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
  ids = theirs.apply_chat_template(messages)["input_ids"]
  b = one_window(tmp_path, tok, sharegpt(pairs, system="Be brief."), ids)
  counted = [t for t, m in zip(b["targets"][0], b["loss_mask"][0]) if m]
  assert tok.decode(counted) == "".join(a for _, a in pairs)
  assert counted.count(tok.token_to_id("<|im_end|>")) == len(pairs) and counted[-1] == tok.eos_id
