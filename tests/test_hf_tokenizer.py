"""The Hugging Face `tokenizers` backend (`llama_jax.tokenizer.hf`) and the folder it reads
(`tokenizer.files`), against `transformers.AutoTokenizer` / `GenerationConfig` on the same folders:
ids with and without special tokens, decoding, BOS/EOS/pad and several EOS ids, saving, bad input."""

import json
import random

import pytest
import transformers
from conftest import HF_WORDS, write_hf_tokenizer, xla_flags

from llama_jax.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, TokenizerError, load_tokenizer

FIXED = ["Hello world", " leading space", "  two leading spaces", "multiple   spaces\tand\ttabs\n\n\nnewlines",
         "你好世界，中文。", "emoji 😀🎉 and a rarer one 🦜", "café naïve Ωμέγα", "ሰላም (no piece for it: bytes)",
         "def f(x):\n    return x  +  1\n", "trailing  ", "", " ", "\n", "a\u00a0b\u200bc",
         "<s>[INST] hi [/INST] ok </s>", "x </s> y <unk>", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
         "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhey<|eot_id|>", "<|endoftext|>tail"]
PIECES = HF_WORDS + [" ", "  ", "\n", "\t", "    ", "<s>", "</s>", "<|im_end|>", "<|eot_id|>", "ሰ", "🦜", ",", "."]


def sample_texts(n=300, seed=0):
  rng = random.Random(seed)
  return FIXED + ["".join(rng.choice(PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(1, 25)))
                  for _ in range(n)]


STYLES = {
    "llama3": ("llama3", {}),
    "chatml_gpt2": ("chatml", {}),
    "llama2": ("llama2", {}),  # LlamaTokenizerFast, legacy=false: transformers 5 rebuilds the pipeline
    "llama2_legacy": ("llama2", {"legacy": True}),
    "llama2_no_prefix_space": ("llama2", {"add_prefix_space": False}),
    "llama2_as_is": ("llama2", {"tokenizer_class": "PreTrainedTokenizerFast"}),
    "no_class": ("llama3", {"tokenizer_class": ...}),
}


@pytest.fixture(scope="module", params=sorted(STYLES))
def folder(request, tmp_path_factory):
  style, config = STYLES[request.param]
  return write_hf_tokenizer(tmp_path_factory.mktemp(request.param), style, **config)


def test_ids_and_text_equal_transformers(folder):
  ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
  if json.load(open(folder / "tokenizer_config.json")).get("tokenizer_class") is None:
    # With no class named, transformers picks LlamaTokenizer from config.json's model_type and
    # rebuilds a byte-level file into nonsense; we read the file as it is. Our export names the class.
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
  assert isinstance(ours, HFTokenizer)
  texts = sample_texts()
  for text in texts:
    with_special = theirs(text)["input_ids"]
    plain = theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text) == with_special, text
    assert ours.encode(text, bos=False) == plain, text
    assert ours.decode(plain) == theirs.decode(plain, skip_special_tokens=True), text
  assert ours.encode_batch(texts) == [theirs(t)["input_ids"] for t in texts]
  assert ours.encode_batch(texts, num_threads=1, bos=False) == ours.encode_batch(texts, bos=False)
  assert [i for i, _, _ in ours.encode_with_offsets(texts[0])] == theirs(texts[0], add_special_tokens=False)["input_ids"]
  assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
  assert ours.pad_id == (theirs.pad_token_id if theirs.pad_token_id is not None else theirs.eos_token_id)
  assert ours.vocab_size == len(theirs)
  assert ours.chat_template == theirs.chat_template
  assert ours.special_tokens_map == {k: v for k, v in theirs.special_tokens_map.items() if isinstance(v, str)}
  # EOS then a document's own BOS: what the data pipeline writes.
  doc = ours.encode("the cat", bos=True, eos=True)
  assert doc[-1] == ours.eos_id and doc[:-1] == with_special[:0] + theirs("the cat")["input_ids"]


def test_eos_ids_are_generation_configs(tmp_path):
  folder = write_hf_tokenizer(tmp_path, "llama3")
  tok = load_tokenizer(folder)
  generation = transformers.GenerationConfig.from_pretrained(folder)
  eot, end = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")
  assert tok.eos_id == eot and set(tok.eos_ids) == {eot, end} == set(generation.eos_token_id)
  assert tok.generation_config["temperature"] == generation.temperature == 0.6
  assert tok.add_bos and not load_tokenizer(write_hf_tokenizer(tmp_path / "c", "chatml")).add_bos


def test_added_tokens_missing_from_the_file_take_the_configs_ids(tmp_path):
  # added_tokens_decoder's tokens that tokenizer.json lacks, special and not interleaved: each at
  # the id the config gives it, as transformers puts them.
  folder = write_hf_tokenizer(tmp_path, "llama3")
  n = load_tokenizer(folder).vocab_size
  config = json.loads((folder / "tokenizer_config.json").read_text())
  entry = dict(lstrip=False, rstrip=False, normalized=False, single_word=False)
  config["added_tokens_decoder"] = {str(n): {"content": "<tool>", "special": False, **entry},
                                    str(n + 1): {"content": "<sp1>", "special": True, **entry},
                                    str(n + 2): {"content": "<tool2>", "special": False, **entry}}
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
  assert [ours.token_to_id(t) for t in ("<tool>", "<sp1>", "<tool2>")] == [n, n + 1, n + 2]
  text = "a<tool>b<sp1>c<tool2>"
  assert ours.encode(text, bos=False) == theirs(text, add_special_tokens=False)["input_ids"]


def test_special_tokens_map_file_and_chat_template_file(tmp_path):
  # special_tokens_map.json overrides the config's named tokens when it has no added_tokens_decoder;
  # chat_template.jinja overrides the config's template; a list of templates uses "default".
  folder = write_hf_tokenizer(tmp_path, "llama3", chat_template=[{"name": "default", "template": "D"},
                                                                  {"name": "tool_use", "template": "T"}])
  (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|end_of_text|>"}}))
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  ours = load_tokenizer(folder)
  assert ours.chat_template == "D" == theirs.get_chat_template()
  assert ours.pad_id == theirs.pad_token_id == ours.token_to_id("<|end_of_text|>")
  (folder / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
  assert load_tokenizer(folder).chat_template == transformers.AutoTokenizer.from_pretrained(folder).chat_template


def test_save_reads_back_in_both(tmp_path):
  source = write_hf_tokenizer(tmp_path / "src", "llama2")
  (source / "tokenizer_config.json").write_text(json.dumps(
      {k: v for k, v in json.loads((source / "tokenizer_config.json").read_text()).items() if k != "tokenizer_class"}))
  tok = load_tokenizer(source)
  tok.save(tmp_path / "out")
  again, theirs = load_tokenizer(tmp_path / "out"), transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  for text in sample_texts(100, seed=1):
    assert again.encode(text) == tok.encode(text) == theirs(text)["input_ids"], text
  assert again.chat_template == tok.chat_template and again.eos_ids == tok.eos_ids
  assert Tokenizer(tmp_path / "out" / "tokenizer.json").encode("hi") == tok.encode("hi")


def test_the_backend_follows_the_folder(tmp_path):
  from conftest import train_word_tokenizer
  sp_model = train_word_tokenizer(tmp_path, 300)
  assert isinstance(Tokenizer(sp_model), SentencePieceTokenizer)
  (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
  assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
  write_hf_tokenizer(tmp_path, "llama2")
  assert isinstance(load_tokenizer(tmp_path), HFTokenizer)  # tokenizer.json wins, as in transformers


def test_a_save_over_another_tokenizer_leaves_none_of_its_files(tmp_path):
  # A model saved over another model's folder: the old tokenizer.json would win over the new
  # tokenizer.model when the folder is read.
  from conftest import train_word_tokenizer
  out = write_hf_tokenizer(tmp_path / "out", "llama2")
  sp = Tokenizer(train_word_tokenizer(tmp_path, 300))
  sp.save(out)
  again = load_tokenizer(out)
  assert isinstance(again, SentencePieceTokenizer) and again.encode("the cat") == sp.encode("the cat")
  assert not (out / "tokenizer.json").exists()
  load_tokenizer(write_hf_tokenizer(tmp_path / "hf", "llama2")).save(out)  # and the other way round
  assert isinstance(load_tokenizer(out), HFTokenizer) and not (out / "tokenizer.model").exists()


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ('{"model": {"type": "Nonsense"}}', "not a tokenizer.json the tokenizers library reads"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_tokenizer_json_is_one_line(tmp_path, content, expected):
  (tmp_path / "tokenizer.json").write_text(content)
  with pytest.raises(TokenizerError, match=expected) as e:
    load_tokenizer(tmp_path)
  assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_no_tokenizer_is_one_line(tmp_path):
  with pytest.raises(TokenizerError, match="no tokenizer"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.model").write_text("not a model")
  with pytest.raises(TokenizerError, match="not a SentencePiece model"):
    load_tokenizer(tmp_path)


CHATS = [[("What is the color of the sky?", "The sky is blue.")],
         [("Name a fruit.", "An apple is a fruit."), ("What color is it?", "It is red or green.")],
         [("Say hello.", "Hello, my friend.")]]


@pytest.mark.slow
def test_a_tokenizer_json_model_end_to_end(tmp_path):
  """A random tiny LLaMA saved by transformers with a Llama 3-style tokenizer.json (chat template,
  two EOS ids) goes import -> generate.py --prompt -> train.py SFT (init_from) -> generate.py --chat
  -> convert --to hf -> transformers, with equal ids, chat text and logits."""
  import io
  import os
  import shutil
  import subprocess
  import sys
  import textwrap

  import numpy as np
  import torch

  import llama_jax
  from llama_jax.convert.cli import main as convert_main
  from llama_jax.generate.cli import main as generate_main
  from llama_jax.generate.generator import generate_tokens

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  base = tmp_path / "base"
  tokenizer_dir = write_hf_tokenizer(tmp_path / "tok", "llama3")
  theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  eos = sorted(load_tokenizer(tokenizer_dir).eos_ids)
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=theirs.bos_token_id,
      eos_token_id=eos)
  transformers.LlamaForCausalLM(hf_config).save_pretrained(base)
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    shutil.copyfile(tokenizer_dir / name, base / name)

  def run_generate(argv, stdin=""):
    out = io.StringIO()
    assert generate_main([str(a) for a in argv], stdin=io.StringIO(stdin), stdout=out) == 0
    return out.getvalue()

  # Import and generate: the greedy continuation is transformers'.
  record = json.loads(run_generate(["--checkpoint", base, "--prompt", "the cat sat", "--temperature", "0",
                                    "--max_new_tokens", "6", "--output", "-"]))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
  prompt = theirs("the cat sat", return_tensors="pt").input_ids
  new = hf_model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos[0])[0, prompt.shape[1]:].tolist()
  new = [t for t in new if t not in eos]
  prompt_text = theirs.decode(prompt[0], skip_special_tokens=True)
  assert record["completion"] == theirs.decode(prompt[0].tolist() + new, skip_special_tokens=True)[len(prompt_text):]

  # Fine-tune on conversations with the model's own template (data.tokenizer empty: init_from's).
  path = tmp_path / "chats.jsonl"
  path.write_text("".join(json.dumps({"conversations": [
      {"from": r, "value": v} for q, a in pairs for r, v in (("human", q), ("gpt", a))]}) + "\n" for pairs in CHATS))
  shape = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden_dim=128,
               max_seq_len=128, norm_eps=1e-6)
  overrides = "\n".join(f"  config.model.{k} = {v!r}" for k, v in shape.items())
  (tmp_path / "cfg.py").write_text(textwrap.dedent(f"""\
      import ml_collections
      from configs import sft_tiny
      from llama_jax.data.config import source

      def get_config():
        config = sft_tiny.get_config()
        config.init_from = {str(base)!r}
        config.data.sources = ml_collections.ConfigDict(dict(chat=source({str(path)!r}, 1.0, epochs=1, format="sharegpt")))
        config.data.prefetch = 1
        config.seq_len = 64
        config.batch_size = 2
        config.mesh.fsdp = -1
      """) + overrides + "\n  return config\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  proc = subprocess.run([sys.executable, "train.py", f"--config={tmp_path / 'cfg.py'}", f"--workdir={tmp_path / 'run'}"],
                        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = tmp_path / "run"
  tuned = load_tokenizer(run)
  assert isinstance(tuned, HFTokenizer) and tuned.chat_template == theirs.chat_template
  assert sorted(tuned.eos_ids) == eos and os.listdir(run / "checkpoints")

  # Chat with the fine-tuned model: the prompt is transformers' apply_chat_template.
  out = run_generate(["--checkpoint", run, "--chat", "--temperature", "0", "--max_new_tokens", "6"], stdin="the cat\n")
  model = llama_jax.load(run)
  ids = theirs.apply_chat_template([{"role": "user", "content": "the cat"}], add_generation_prompt=True)["input_ids"]
  answer = generate_tokens(model.config, model.params, [ids], 6, eos_ids=tuned.eos_ids)[0]
  assert out.splitlines() == ["assistant: " + tuned.decode([t for t in answer if t not in eos]).strip()]

  # Export and load in transformers: ids, chat text, generation config and logits.
  assert convert_main(["--input", str(run), "--output", str(tmp_path / "out"), "--to", "hf"]) == 0
  exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  for text in sample_texts(100, seed=2):
    assert exported(text)["input_ids"] == tuned.encode(text) == theirs(text)["input_ids"], text
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
  assert exported.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)
  generation = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
  assert sorted(generation.eos_token_id) == eos and generation.temperature == 0.6
  hf_tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
  with torch.no_grad():
    expected = hf_tuned(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(model.logits([ids]), expected, rtol=1e-4, atol=1e-4)


def _tiktoken_file(folder, path):
  """A Meta-style tiktoken rank file made of a byte-level BPE's vocabulary (ranks = its ids, the
  order its merges were learned in)."""
  import base64

  from llama_jax.tokenizer.byte_level import CHAR_TO_BYTE as byte_of
  vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
  with open(path, "w") as f:
    for text, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
      f.write(base64.b64encode(bytes(byte_of[c] for c in text)).decode() + f" {rank}\n")
  return {bytes(byte_of[c] for c in text): rank for text, rank in vocab.items()}


def test_meta_llama3_tokenizer_model_is_tiktokens(tmp_path):
  # Meta's Llama 3 tokenizer.model holds tiktoken's ranks: its ids are tiktoken's (Meta's own
  # tokenizer.py runs tiktoken), its save a tokenizer.json that transformers reads with the same ids.
  import tiktoken

  from llama_jax.tokenizer import MetaLlama3Tokenizer
  from llama_jax.tokenizer.meta_llama3 import SPECIAL_TOKENS, SPLIT
  meta = tmp_path / "meta"
  meta.mkdir()
  ranks = _tiktoken_file(write_hf_tokenizer(tmp_path / "bpe", "llama3"), meta / "tokenizer.model")
  n = len(ranks)
  reference = tiktoken.Encoding("llama3_test", pat_str=SPLIT, mergeable_ranks=ranks,
                                special_tokens={name: n + i for i, name in enumerate(SPECIAL_TOKENS)})
  ours = load_tokenizer(meta)
  assert isinstance(ours, MetaLlama3Tokenizer) and ours.vocab_size == n + 256
  assert (ours.bos_id, set(ours.eos_ids)) == (n, {n + 1, n + 8, n + 9})
  texts = sample_texts(300, seed=5) + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]
  for text in texts:
    ids = reference.encode(text, allowed_special="all")
    assert ours.encode(text, bos=False) == ids and ours.encode(text) == [n] + ids, text
    assert ours.decode(ids) == reference.decode([i for i in ids if i < n]), text
  chat = ours.chat_template
  assert "<|start_header_id|>" in chat
  ours.save(tmp_path / "saved")
  again, theirs = load_tokenizer(tmp_path / "saved"), transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
  assert isinstance(again, HFTokenizer) and again.chat_template == chat and set(again.eos_ids) == set(ours.eos_ids)
  for text in texts[:50]:
    assert again.encode(text) == theirs(text)["input_ids"] == ours.encode(text), text


def test_a_post_processor_that_appends_eos_gives_it_only_when_asked(tmp_path):
  # EOS comes with eos=True only (the protocol's rule): transformers' add_special_tokens=True
  # would end every prompt and evaluation context with it.
  folder = write_hf_tokenizer(tmp_path, "llama2")
  spec = json.loads((folder / "tokenizer.json").read_text())
  spec["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                       {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                                               "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
  (folder / "tokenizer.json").write_text(json.dumps(spec))
  ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
  for text in ("the cat sat", "", "hello world"):
    assert ours.encode(text, eos=True) == theirs(text)["input_ids"] == [1] + ours.encode(text, bos=False) + [2]
    assert ours.encode(text) == theirs(text)["input_ids"][:-1]
  assert ours.encode_batch(["a b", "c"]) == [ours.encode("a b"), ours.encode("c")]
  assert ours.encode_batch(["a b", "c"], eos=True) == [ours.encode("a b", eos=True), ours.encode("c", eos=True)]


def test_a_post_processor_appending_another_stop_id_than_eos_token_gives_it_only_when_asked(tmp_path):
  # Llama 3's layout (eos_token <|eot_id|>, generation_config's ids <|end_of_text|> and <|eot_id|>)
  # with a post-processor that appends <|end_of_text|>: that id ends generation too, so a prompt
  # must not end in it either.
  from tokenizers import Tokenizer as RustTokenizer
  from tokenizers import processors
  folder = write_hf_tokenizer(tmp_path, "llama3")
  rust = RustTokenizer.from_file(str(folder / "tokenizer.json"))
  bos, end = rust.token_to_id("<|begin_of_text|>"), rust.token_to_id("<|end_of_text|>")
  rust.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A <|end_of_text|>", special_tokens=[("<|begin_of_text|>", bos), ("<|end_of_text|>", end)])
  rust.save(str(folder / "tokenizer.json"))
  ours = load_tokenizer(folder)
  plain = ours.encode("hi there", bos=False)
  assert ours.encode("hi there") == [bos] + plain
  assert ours.encode("hi there", eos=True) == [bos] + plain + [ours.eos_id] and ours.eos_id != end
  assert ours.encode_batch(["hi there"]) == [[bos] + plain]
