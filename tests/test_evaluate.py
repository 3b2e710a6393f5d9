"""Evaluation against transformers: sliding-window perplexity (the loop of the transformers guide
"Perplexity of fixed-length models", in torch) and choice log-likelihoods; accuracy of a tiny
model trained here on facts it is then asked about; the command line."""

import json
import os
import random
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sentencepiece as spm
import torch
import transformers

from conftest import xla_flags

import llama_jax
from llama_jax import model as M
from llama_jax.config import ModelConfig
from llama_jax.evaluate import EvalDataError, choice, data, perplexity, scoring
from llama_jax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
         "mallory", "oscar"]
COLORS = ["red", "green", "blue", "black"]
FACTS = {name: COLORS[(i * 7 + i // 4) % 4] for i, name in enumerate(NAMES)}  # every color used
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "far", "away", "from", "home",
         "likes", "sun", "moon", "tree", "river", "stone", "bird", "sang", "song", "night", "day"]


def _corpus(n_lines=300, seed=0):
  rng = random.Random(seed)
  lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n_lines)]
  return lines + [f"{n} likes {c}" for n, c in FACTS.items()] * 5


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("sp") / "sp")
  # LLaMA's conventions: BPE with byte fallback, unk 0, BOS 1, EOS 2, no pad piece.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_corpus()), model_prefix=prefix, vocab_size=320, model_type="bpe",
      byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      remove_extra_whitespaces=False, minloglevel=2)
  return prefix + ".model"


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, sp_path):
  """A tiny random transformers LLaMA saved as a Hugging Face directory, and the torch model."""
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=spm.SentencePieceProcessor(model_file=sp_path).vocab_size(), hidden_size=64,
      intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
      bos_token_id=1, eos_token_id=2)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # larger than the 0.02 default, so predictions differ from token to token
    for p in model.parameters():
      p.normal_(0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
  directory = tmp_path_factory.mktemp("hf")
  model.save_pretrained(directory)
  shutil.copyfile(sp_path, directory / "tokenizer.model")
  return str(directory), model


def _torch_guide_perplexity(model, ids, max_length, stride):
  """The loop of the transformers perplexity guide, counting each window's scored tokens exactly
  (the guide's `num_valid_tokens - batch_size` is one short when the first label is masked)."""
  encodings = torch.tensor([ids])
  seq_len = encodings.size(1)
  nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
  for begin_loc in range(0, seq_len, stride):
    end_loc = min(begin_loc + max_length, seq_len)
    trg_len = end_loc - prev_end_loc
    input_ids = encodings[:, begin_loc:end_loc]
    target_ids = input_ids.clone()
    target_ids[:, :-trg_len] = -100
    with torch.no_grad():
      loss = model(input_ids, labels=target_ids).loss.double()
    num_loss_tokens = int((target_ids[:, 1:] != -100).sum())  # the labels left after the shift
    nll_sum += float(loss) * num_loss_tokens
    n_tokens += num_loss_tokens
    prev_end_loc = end_loc
    if end_loc == seq_len:
      break
  avg_nll = nll_sum / n_tokens
  return {"perplexity": float(np.exp(avg_nll)), "nll": avg_nll, "tokens": n_tokens}


def _text(n_words=120, seed=3):
  rng = random.Random(seed)
  return " ".join(rng.choice(WORDS) for _ in range(n_words))


def test_windows_score_every_token_once():
  for n, seq_len, stride in [(50, 16, 16), (50, 16, 5), (17, 16, 1), (16, 16, 16), (3, 8, 8)]:
    ws = perplexity.windows(n, seq_len, stride)
    scored = [t for _, e, f in ws for t in range(f, e)]
    assert all(e - b <= seq_len and f > b for b, e, f in ws)
    assert len(scored) == len(set(scored))
    if stride < seq_len:
      assert sorted(scored) == list(range(1, n))  # each token after the first, once
    else:  # disjoint windows: the first token of each is context only
      assert sorted(scored) == [t for t in range(1, n) if t % seq_len]


@pytest.mark.parametrize("seq_len,stride", [(32, 32), (32, 12), (24, 5)])
def test_perplexity_matches_transformers(hf_model, seq_len, stride):
  directory, torch_model = hf_model
  model = llama_jax.load(directory)
  text = _text()
  tokens = model.tokenizer.encode(text, bos=True)
  assert len(tokens) > 3 * seq_len  # several windows
  ours = perplexity.perplexity(model, text, seq_len=seq_len, stride=stride, batch_size=4,
                               progress=False)
  ref = _torch_guide_perplexity(torch_model, tokens, seq_len, stride)
  assert ours["tokens"] == ref["tokens"] == (len(tokens) - 1 if stride < seq_len else ref["tokens"])
  np.testing.assert_allclose(ours["perplexity"], ref["perplexity"], rtol=1e-4)
  np.testing.assert_allclose(ours["nll"], ref["nll"], rtol=1e-4)
  assert ours["perplexity"] > 20  # a random model: far from 1, so the comparison means something


def test_scores_do_not_depend_on_padding_or_batching(hf_model):
  directory, _ = hf_model
  model = llama_jax.load(directory)
  rng = np.random.default_rng(0)
  requests = [scoring.Request(list(rng.integers(3, 300, size=n)), max(1, n // 2)) for n in (5, 40, 9, 12)]
  batched = scoring.score(model.config, model.params, requests, batch_size=4, progress=False)
  for r, s in zip(requests, batched):
    alone = scoring.score(model.config, model.params, [r], batch_size=1, progress=False)[0]
    np.testing.assert_allclose(s.logprob, alone.logprob, rtol=1e-5)
    assert s.count == len(r.tokens) - r.start


def _examples():
  return [data.Example(f"{n} likes", tuple(" " + c for c in COLORS), COLORS.index(c), i + 1)
          for i, (n, c) in enumerate(FACTS.items())]


def test_encode_pair_keeps_the_word_boundary(sp_path):
  tok = Tokenizer(sp_path)
  for context in ("alice likes", "alice likes "):  # a trailing space moves to the continuation
    ctx, cont = choice.encode_pair(tok, context, " red" if context.endswith("s") else "red")
    assert ctx == tok.encode("alice likes", bos=True)
    assert ctx + cont == tok.encode("alice likes red", bos=True)
    assert cont == tok.encode("red", bos=False)  # the word-initial pieces ("\u2581r" ...)
  # The pitfall avoided: encoded alone, " red" gets SentencePiece's dummy prefix as well.
  assert tok.encode(" red", bos=False) != tok.encode("red", bos=False)


def test_choice_logprobs_match_transformers(hf_model):
  directory, torch_model = hf_model
  model = llama_jax.load(directory)
  examples = _examples()[:4] + [data.Example("the cat sat on the", (" mat", " river stone", " dog"), 0, 5)]
  contexts = choice.fewshot_contexts(examples, shots=2, seed=1)
  ours = choice.choice_logprobs(model.config, model.params, model.tokenizer, contexts, examples,
                                batch_size=4, progress=False)
  sp = model.tokenizer.sp
  for context, example, lls in zip(contexts, examples, ours):
    for c, ll in zip(example.choices, lls):
      # The split of lm-eval-harness: the context alone, then the whole's tokens past its length.
      n_ctx = 1 + len(sp.encode(context))
      whole = [1] + sp.encode(context) + ([1] + sp.encode(context + c))[n_ctx:]
      with torch.no_grad():
        logits = torch_model(torch.tensor([whole])).logits[0].double()
      logp = torch.log_softmax(logits, -1)
      ref = sum(float(logp[t - 1, whole[t]]) for t in range(n_ctx, len(whole)))
      np.testing.assert_allclose(ll, ref, rtol=1e-4)


def test_fewshot_never_shows_the_example_itself():
  examples = _examples()
  contexts = choice.fewshot_contexts(examples, shots=3, seed=7)
  for example, context in zip(examples, contexts):
    demos = context.split(choice.FEWSHOT_DELIMITER)
    assert len(demos) == 4 and demos[-1] == example.context
    assert not any(d.startswith(example.context + " ") for d in demos[:-1])
  assert contexts == choice.fewshot_contexts(examples, shots=3, seed=7)
  assert contexts != choice.fewshot_contexts(examples, shots=3, seed=8)


TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16,
                   max_seq_len=64)


def _random_params(cfg, seed):
  """Meta's initialisation (normal 0.02, RMSNorm weights 1) drawn with numpy: faster on a busy CPU
  than running the Flax initialiser un-jitted."""
  shapes = nn.unbox(jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0))))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if "norm" in jax.tree_util.keystr(path):
      return jnp.ones(s.shape, s.dtype)
    return jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _train_on_facts(tok, steps=120):
  """A tiny llama_jax model trained (next-token loss) on "NAME likes COLOR" until it knows them."""
  seqs = [tok.encode(f"{n} likes {c}", bos=True, eos=True) for n, c in FACTS.items()]
  length = max(map(len, seqs))
  tokens = np.zeros((len(seqs), length), np.int32)
  mask = np.zeros((len(seqs), length - 1), np.float32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
    mask[i, :len(s) - 1] = 1
  params = _random_params(TINY, 0)
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    def loss_fn(p):
      logits = M.Transformer(TINY).apply({"params": p}, tokens[:, :-1])
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
      return (nll * mask).sum() / mask.sum()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  for _ in range(steps):
    params, state, loss = step(params, state)
  assert float(loss) < 0.5
  return params


@pytest.fixture(scope="module")
def trained_and_random(tmp_path_factory, sp_path):
  tok = Tokenizer(sp_path)
  root = tmp_path_factory.mktemp("models")
  trained = llama_jax.Model(TINY, _train_on_facts(tok), tok)
  random_model = llama_jax.Model(TINY, _random_params(TINY, 1), tok)
  trained.save(str(root / "trained"))
  random_model.save(str(root / "random"))
  facts = root / "facts.jsonl"
  facts.write_text("".join(json.dumps({"context": e.context, "choices": list(e.choices),
                                       "label": e.label}) + "\n" for e in _examples()))
  return trained, random_model, str(root / "trained"), str(root / "random"), str(facts)


@pytest.mark.slow
def test_trained_model_knows_the_answers_random_model_does_not(trained_and_random):
  trained, random_model, _, _, facts = trained_and_random
  good = choice.choice_file(trained, facts, batch_size=8, progress=False)
  assert good == {"acc": 1.0, "acc_norm": 1.0, "examples": len(FACTS)}
  chance = choice.choice_file(random_model, facts, batch_size=8, progress=False)
  assert chance["acc"] <= 0.5  # 4 choices: chance is 0.25


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  return subprocess.run([sys.executable, "-m", "llama_jax.evaluate", *args, "--no_progress"],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.slow
def test_cli_perplexity_last_line_is_json(hf_model, tmp_path):
  directory, torch_model = hf_model
  text = _text()
  lines = text.split(" on ")
  path = tmp_path / "held_out.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
  out = _cli("perplexity", "--model", directory, "--data", str(path), "--seq_len", "32", "--stride", "16")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  tokens = [1] + spm.SentencePieceProcessor(model_file=directory + "/tokenizer.model").encode(
      data.TEXT_JOIN.join(lines))
  ref = _torch_guide_perplexity(torch_model, tokens, 32, 16)
  assert result["tokens"] == ref["tokens"]
  np.testing.assert_allclose(result["perplexity"], ref["perplexity"], rtol=1e-4)


def test_cli_an_example_longer_than_the_context_is_one_line(hf_model, tmp_path):
  directory, _ = hf_model  # a context of 64 positions
  path = tmp_path / "long.jsonl"
  path.write_text(json.dumps({"context": "the", "choices": [" cat" * 100, " dog"], "label": 1}) + "\n")
  out = _cli("choice", "--model", directory, "--data", str(path))
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert "do not fit in a context of 64" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_compares_models_in_one_table(trained_and_random):
  _, _, trained, random_dir, facts = trained_and_random
  out = _cli("choice", "--model", trained, "--model", random_dir, "--data", facts)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[0].split() == ["model", "acc", "acc_norm", "examples"]
  assert lines[2].split()[:2] == [trained, "1.0000"] and lines[3].split()[0] == random_dir
  rows = json.loads(lines[-1])
  assert [r["model"] for r in rows] == [trained, random_dir]
  assert rows[0]["acc"] == 1.0 and rows[1]["acc"] <= 0.5


@pytest.mark.parametrize("name,content,message", [
    ("empty.jsonl", "", "empty.jsonl: no examples"),
    ("nochoices.jsonl", '{"context": "a", "choices": [" b"], "label": 0}\n{"context": "a", "label": 0}\n',
     'nochoices.jsonl:2: line has no "choices"'),
    ("label.jsonl", '{"context": "a", "choices": [" b", " c"], "label": 2}\n',
     "label.jsonl:1: label 2 is out of range"),
    ("blank.txt", "  \n\n", "blank.txt: no text"),
])
def test_cli_bad_input_is_one_line(tmp_path, name, content, message):
  path = tmp_path / name
  path.write_text(content)
  command = "perplexity" if name.endswith(".txt") else "choice"
  out = _cli(command, "--model", str(tmp_path / "no_model"), "--data", str(path))
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_cli_missing_model_is_one_line(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("the cat sat on the mat")
  out = _cli("perplexity", "--model", str(tmp_path / "nowhere"), "--data", str(path))
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "nowhere" in out.stderr


def test_acc_norm_leaves_the_separating_space_out():
  # lm-eval divides by the choice's length without its target delimiter: " ab" is 2 characters.
  example = data.Example("q:", (" ab", " abcd"), 1, 1)
  scores = choice.accuracy([example], [[-2.0, -3.5]])  # -2/2 = -1 < -3.5/4; with the spaces -2/3 > -3.5/5
  assert (scores["acc"], scores["acc_norm"]) == (0.0, 1.0)


def test_text_that_is_not_utf8_names_the_file(tmp_path):
  for name in ("bad.txt", "bad.jsonl"):
    path = tmp_path / name
    path.write_bytes(b'{"text": "ok"}\n\xff\xfe oops\n')
    with pytest.raises(data.EvalDataError, match=f"{name}(:2)?: not UTF-8 text"):
      data.read_text(str(path))
  (tmp_path / "bad.jsonl").write_bytes(b'{"context": "a", "choices": [" b"], "label": 0}\n\xff\xfe oops\n')
  with pytest.raises(data.EvalDataError, match="bad.jsonl:2: not UTF-8 text"):
    data.read_choices(str(tmp_path / "bad.jsonl"))


def test_short_text_is_an_error_naming_the_file(tmp_path):
  # SentencePiece's default normaliser (not LLaMA's) drops a zero-width space: BOS alone remains.
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus(50)), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=100, model_type="bpe", minloglevel=2)
  model = llama_jax.Model(TINY, None, Tokenizer(str(tmp_path / "sp.model")))
  short = tmp_path / "short.txt"
  short.write_text("\u200b")
  with pytest.raises(EvalDataError, match=r"short.txt: the text encodes to 1 token"):
    perplexity.perplexity_file(model, str(short))
  no_text = tmp_path / "no_text.jsonl"
  no_text.write_text('{"text": "the"}\n{"title": "x"}\n')
  with pytest.raises(EvalDataError, match=r'no_text.jsonl:2: line has no string field "text"'):
    perplexity.perplexity_file(model, str(no_text))


def test_cli_perplexity_on_a_tokenizer_json_folder(tmp_path, capsys):
  # A Hugging Face folder with a Llama 3-style tokenizer.json: the text's ids are AutoTokenizer's.
  from conftest import write_hf_tokenizer

  from llama_jax.evaluate.__main__ import main
  folder = write_hf_tokenizer(tmp_path / "model", "llama3")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  torch_model = transformers.LlamaForCausalLM(config).eval()
  torch_model.save_pretrained(folder)
  text = "你好 the cat 😀 sat on the mat\n\n  and the dog ran far away from the big red tree house " * 3
  (tmp_path / "text.txt").write_text(text)
  assert main(["perplexity", "--model", str(folder), "--data", str(tmp_path / "text.txt"), "--seq_len", "32",
               "--no_progress"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  tokens = transformers.AutoTokenizer.from_pretrained(folder)(data.read_text(str(tmp_path / "text.txt")))["input_ids"]
  ref = _torch_guide_perplexity(torch_model, tokens, 32, 32)
  assert result["tokens"] == ref["tokens"] and len(tokens) > 64
  np.testing.assert_allclose(result["perplexity"], ref["perplexity"], rtol=1e-4)


def test_perplexity_refuses_windows_beyond_the_context_and_zero():
  # Positions past max_seq_len (64) were never trained on; 0 is a bad value, not "the default".
  tokens = list(range(1, 200))
  for kwargs, message in [({"seq_len": 65}, "seq_len 65 is longer than the model's context of 64 tokens"),
                          ({"seq_len": 0}, "seq_len must be at least 2, got 0"),
                          ({"seq_len": 32, "stride": 0}, r"stride must lie in \[1, seq_len=32\], got 0"),
                          ({"stride": 0}, r"stride must lie in \[1, seq_len=64\], got 0")]:
    with pytest.raises(ValueError, match=message):
      perplexity.perplexity_of_tokens(TINY, None, tokens, progress=False, **kwargs)
  with pytest.raises(ValueError, match=r"max_len must lie in \[1, 64\].*got 65"):
    scoring.score(TINY, None, [scoring.Request([1, 2, 3], 1)], max_len=65, progress=False)


def _main(capsys, *args):
  """The command line in this process: (exit code, stderr)."""
  from llama_jax.evaluate.__main__ import main
  code = main([*args, "--no_progress"])
  return code, capsys.readouterr().err


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text(_text())
  return str(path)


def test_cli_refuses_a_seq_len_beyond_the_context(hf_model, text_file, capsys):
  directory, _ = hf_model  # a context of 64 positions
  code, err = _main(capsys, "perplexity", "--model", directory, "--data", text_file, "--seq_len", "65")
  assert code == 1 and "Traceback" not in err
  assert err.strip().splitlines()[-1] == (
      f"error: {directory}: --seq_len 65 is longer than the model's context of 64 tokens (its max_seq_len)")
  code, err = _main(capsys, "perplexity", "--model", directory, "--data", text_file, "--stride", "65")
  assert code == 1 and "--stride 65 is longer than the window of 64 tokens" in err


@pytest.mark.parametrize("flag,message", [("--seq_len", "--seq_len must be at least 2 (a token and its context), got 0"),
                                          ("--stride", "--stride must be positive, got 0")])
def test_cli_refuses_zero_seq_len_and_stride(text_file, capsys, flag, message):
  code, err = _main(capsys, "perplexity", "--model", "no_model", "--data", text_file, flag, "0")
  assert code == 2 and err.strip() == f"error: {message}"


def test_cli_names_the_dtype_flag(text_file, capsys):
  from llama_jax.evaluate.__main__ import main
  with pytest.raises(SystemExit) as exit:
    main(["perplexity", "--model", "no_model", "--data", text_file, "--dtype", "float8"])
  err = capsys.readouterr().err
  assert exit.value.code == 2 and "argument --dtype: invalid choice: 'float8'" in err


def test_cli_not_a_checkpoint_names_the_path_once(tmp_path, text_file, capsys):
  peft, empty = tmp_path / "tiny_peft", tmp_path / "empty"
  peft.mkdir(), empty.mkdir()
  (peft / "adapter_config.json").write_text('{"peft_type": "LORA"}')
  code, err = _main(capsys, "perplexity", "--model", str(peft), "--data", text_file)
  assert code == 1 and err.count(str(peft)) == 1
  assert err.startswith(f"error: {peft}: a Hugging Face PEFT LoRA adapter (adapter_config.json)")
  assert "--merge_lora" in err
  code, err = _main(capsys, "perplexity", "--model", str(empty), "--data", text_file)
  assert code == 1 and err.count(str(empty)) == 1 and f"{empty}: not a checkpoint" in err
