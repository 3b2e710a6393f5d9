import io
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest
from conftest import train_word_tokenizer

import llama_jax
from llama_jax import model as M
from llama_jax.config import ModelConfig
from llama_jax.generate.cli import main
from llama_jax.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=320, multiple_of=16,
                   max_seq_len=64)
GREEDY = ["--temperature", "0", "--max_new_tokens", "8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  train_word_tokenizer(root, TINY.vocab_size)
  params = nn.unbox(M.init_params(TINY, jax.random.key(0)))
  model = llama_jax.Model(TINY, params, Tokenizer(root / "sp.model"))
  model.save(str(root / "model"))
  return root / "model"


def _main(argv, stdin=""):
  out = io.StringIO()
  code = main([str(a) for a in argv], stdin=io.StringIO(stdin), stdout=out)
  return code, out.getvalue()


def _expected(checkpoint, prompts):
  model = llama_jax.load(checkpoint)
  return model.generate(prompts, max_new_tokens=8)


def test_one_prompt_streams_the_greedy_continuation(checkpoint):
  code, out = _main(["--checkpoint", checkpoint, "--prompt", "the cat", *GREEDY])
  assert code == 0
  assert out == "the cat" + _expected(checkpoint, ["the cat"])[0] + "\n"


@pytest.mark.slow
def test_prompt_file_with_jsonl_output(checkpoint, tmp_path):
  prompts = ["the red tree", "a dog", "small house on the mat"]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
  code, _ = _main(["--checkpoint", checkpoint, "--prompt_file", tmp_path / "p.jsonl",
                   "--output", tmp_path / "out.jsonl", "--batch_size", "2", *GREEDY])
  assert code == 0
  records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [r["prompt"] for r in records] == prompts
  assert [r["completion"] for r in records] == _expected(checkpoint, prompts)
  assert all(r["num_tokens"] <= 8 for r in records)


@pytest.mark.slow
def test_chat_loop_reads_turns_from_stdin(checkpoint):
  # a short system line: the default Vicuna one alone is longer than this tiny model's context
  code, out = _main(["--checkpoint", checkpoint, "--chat", "--system", "Chat.", *GREEDY],
                    stdin="the cat\n\nthe dog\n")
  assert code == 0
  answers = [line for line in out.splitlines() if line.startswith("ASSISTANT: ")]
  assert len(answers) == 2
  # the first answer is the greedy continuation of the Vicuna prompt for the first message
  from llama_jax.tokenizer import chat
  model = llama_jax.load(checkpoint)
  ids = chat.get_template().with_system("Chat.").encode_prompt([{"role": "user", "content": "the cat"}], model.tokenizer)
  first = model.generate([ids], max_new_tokens=8)[0][len(ids):]
  text = model.tokenizer.decode([t for t in first if t != model.tokenizer.eos_id])
  assert answers[0] == "ASSISTANT: " + text


def test_chat_history_is_trimmed_to_fit(checkpoint):
  from llama_jax.tokenizer import chat
  from llama_jax.generate.cli import fit_history
  tok = llama_jax.load(checkpoint).tokenizer
  history = []
  for i in range(6):
    history += [{"role": "user", "content": f"the cat sat {i}"},
                {"role": "assistant", "content": "on a mat " * 3}]
  template = chat.get_template().with_system("Chat.")
  ids, kept = fit_history(template, history, "the dog", tok, budget=60)
  assert len(ids) <= 60 and 0 < len(kept) < len(history) and kept == history[len(history) - len(kept):]
  assert fit_history(template, [], "the dog " * 50, tok, budget=64)[0] is None


def _run(*argv, stdin=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *map(str, argv)],
                        capture_output=True, text=True, env=env, input=stdin, cwd=ROOT, timeout=120)


@pytest.mark.slow
def test_entry_point_runs(checkpoint):
  r = _run("--checkpoint", checkpoint, "--prompt", "the cat", "--prompt", "a dog", "--output", "-",
           *GREEDY)
  assert r.returncode == 0, r.stderr
  assert [json.loads(line)["prompt"] for line in r.stdout.splitlines()] == ["the cat", "a dog"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["long_prompt", "empty_prompt", "missing_checkpoint", "missing_tokenizer"])
def test_bad_input_is_one_clear_line(checkpoint, tmp_path, case):
  argv = {
      "long_prompt": ["--checkpoint", checkpoint, "--prompt", "the big red tree " * 40],
      "empty_prompt": ["--checkpoint", checkpoint, "--prompt", "  "],
      "missing_checkpoint": ["--checkpoint", tmp_path / "nowhere", "--prompt", "hi"],
      "missing_tokenizer": ["--checkpoint", checkpoint, "--tokenizer", tmp_path / "no.model", "--prompt", "hi"],
  }[case]
  expected = {"long_prompt": "context of 64 tokens", "empty_prompt": "prompt 1 is empty",
              "missing_checkpoint": "nowhere", "missing_tokenizer": "no.model"}[case]
  r = _run(*argv)
  assert r.returncode != 0
  assert "Traceback" not in r.stderr
  lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and expected in lines[0], r.stderr


# --- Hugging Face folders with a tokenizer.json: sampling defaults, templates, bad input

def test_generation_config_defaults_apply_unless_a_flag_is_given():
  from llama_jax.generate.cli import parse_args, resolve_sampling
  generation = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 12}
  args = parse_args(["--checkpoint", "x", "--top_p", "0.5"])
  resolve_sampling(args, generation)
  assert (args.temperature, args.top_p, args.top_k, args.max_new_tokens) == (0.7, 0.5, 20, 12)
  args = parse_args(["--checkpoint", "x"])
  resolve_sampling(args, {"do_sample": False, "temperature": 0.7})
  assert (args.temperature, args.top_p, args.top_k, args.max_new_tokens) == (0.0, 0.9, 0, 256)
  args = parse_args(["--checkpoint", "x", "--temperature", "1.0"])
  resolve_sampling(args, {"do_sample": False})
  assert args.temperature == 1.0


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
  """A random tiny model exported as a Hugging Face folder with a Llama 3-style tokenizer.json."""
  from conftest import write_hf_tokenizer

  from llama_jax.tokenizer import load_tokenizer
  root = tmp_path_factory.mktemp("hf")
  tok = load_tokenizer(write_hf_tokenizer(root / "tok", "llama3"))
  cfg = TINY.replace(vocab_size=512)
  llama_jax.Model(cfg, nn.unbox(M.init_params(cfg, jax.random.key(0))), tok).export_hf(str(root / "model"))
  return root / "model"


def _variant(source, destination, **files):
  import shutil
  shutil.copytree(source, destination)
  for name, content in files.items():
    path = destination / name.replace("__", ".")
    if content is None:
      path.unlink()
    elif isinstance(content, dict):
      config = json.loads(path.read_text()) if path.exists() else {}
      config.update(content)
      path.write_text(json.dumps(config))
    else:
      path.write_text(content)
  return destination


def _one_error_line(capsys, argv, stdin=""):
  code, _ = _main(argv, stdin=stdin)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
  return lines[0]


def test_hf_folder_bad_input_is_one_clear_line(hf_checkpoint, tmp_path, capsys):
  from conftest import write_hf_tokenizer
  bad_json = _variant(hf_checkpoint, tmp_path / "bad_json", tokenizer__json="{not json")
  assert "not valid JSON" in _one_error_line(capsys, ["--checkpoint", bad_json, "--prompt", "hi"])
  assert "tokenizer.json" in _one_error_line(capsys, ["--checkpoint", hf_checkpoint, "--tokenizer",
                                                      bad_json / "tokenizer.json", "--prompt", "hi"])
  raises = _variant(hf_checkpoint, tmp_path / "raises",
                    tokenizer_config__json={"chat_template": "{{ raise_exception('this model does not chat') }}"})
  assert "chat template: this model does not chat" in _one_error_line(
      capsys, ["--checkpoint", raises, "--chat", *GREEDY], stdin="hi\n")
  filters = _variant(hf_checkpoint, tmp_path / "filter", tokenizer_config__json={"chat_template": "{{ messages | shout }}"})
  assert "No filter named 'shout'" in _one_error_line(capsys, ["--checkpoint", filters, "--chat", *GREEDY], stdin="hi\n")
  big = _variant(hf_checkpoint, tmp_path / "big", tokenizer__json=None, tokenizer_config__json=None)
  write_hf_tokenizer(big, "llama3")
  import tokenizers
  reserved = tokenizers.Tokenizer.from_file(str(big / "tokenizer.json"))
  reserved.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(100)])  # as Llama 3's
  reserved.save(str(big / "tokenizer.json"))
  line = _one_error_line(capsys, ["--checkpoint", big, "--prompt", "hi"])
  assert "tokens but the model's embedding has 512 rows" in line
  bare = _variant(hf_checkpoint, tmp_path / "bare", tokenizer__json=None, tokenizer_config__json=None)
  line = _one_error_line(capsys, ["--checkpoint", bare, "--prompt", "hi"])
  assert "has no tokenizer" in line and "--tokenizer PATH" in line


def test_hf_folder_chat_uses_its_template_and_stops_at_any_eos(hf_checkpoint):
  import transformers

  from llama_jax.generate.generator import generate_tokens
  model = llama_jax.load(hf_checkpoint)
  theirs = transformers.AutoTokenizer.from_pretrained(hf_checkpoint)
  code, out = _main(["--checkpoint", hf_checkpoint, "--chat", *GREEDY], stdin="the cat\n")
  assert code == 0
  ids = theirs.apply_chat_template([{"role": "user", "content": "the cat"}], add_generation_prompt=True)["input_ids"]
  new = generate_tokens(model.config, model.params, [ids], 8, eos_ids=model.tokenizer.eos_ids)[0]
  answer = model.tokenizer.decode([t for t in new if t not in model.tokenizer.eos_ids]).strip()
  assert out.splitlines() == [f"assistant: {answer}"]
  assert len(model.tokenizer.eos_ids) == 2


@pytest.mark.slow
def test_generation_stops_at_an_eos_id_of_generation_config(hf_checkpoint, tmp_path):
  # Make the token the model picks first one of generation_config.json's EOS ids: generation ends there.
  model = llama_jax.load(hf_checkpoint)
  prompt = model.tokenizer.encode("the cat")
  first = model.generate([prompt], max_new_tokens=1)[0][-1]
  assert first not in model.tokenizer.eos_ids
  generation = json.loads((hf_checkpoint / "generation_config.json").read_text())
  variant = _variant(hf_checkpoint, tmp_path / "stop",
                     generation_config__json={"eos_token_id": list(model.tokenizer.eos_ids) + [first]})
  code, out = _main(["--checkpoint", variant, "--prompt", "the cat", "--output", "-", *GREEDY])
  record = json.loads(out)
  assert code == 0 and record["num_tokens"] == 1 and record["stopped_at_eos"] and record["completion"] == ""
  assert generation["eos_token_id"] == list(model.tokenizer.eos_ids)  # the export wrote them all


def test_decode_kernels_flag_reaches_the_model(checkpoint):
  from llama_jax.generate.cli import load_model, parse_args
  assert load_model(parse_args(["--checkpoint", str(checkpoint)])).config.decode_kernels == "auto"
  model = load_model(parse_args(["--checkpoint", str(checkpoint), "--decode_kernels", "xla"]))
  assert model.config.decode_kernels == "xla"
  # The kernels do not tile this tiny model (D = 64): asked for, its decode keeps XLA's blocks.
  code, out = _main(["--checkpoint", checkpoint, "--prompt", "the cat", "--decode_kernels", "pallas", *GREEDY])
  assert code == 0 and out == "the cat" + _expected(checkpoint, ["the cat"])[0] + "\n"


def test_the_context_note_counts_the_last_token_which_takes_no_place(capsys):
  # A prompt of n tokens in a context of c gets up to c - n + 1 new ones (the last is not fed back).
  from llama_jax.generate.cli import note_context_limit
  note_context_limit(100, 64, 61)
  assert capsys.readouterr().err.endswith("a prompt of 61 tokens gets at most 4 new ones\n")
  note_context_limit(4, 64, 61)  # all of them fit: nothing to say
  assert capsys.readouterr().err == ""
