"""The Hugging Face `tokenizers` backend (`llama_jax.tokenizer.hf`) and the folder it reads
(`tokenizer.files`), against `transformers.AutoTokenizer` / `GenerationConfig` on the same folders:
ids with and without special tokens, decoding, BOS/EOS/pad and several EOS ids, saving, bad input."""

import json
import random

import pytest
import transformers
from conftest import HF_WORDS, write_hf_tokenizer

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
