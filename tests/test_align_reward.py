"""Reward models (llama_jax.align.reward): saved and loaded through the public API, scoring text and
conversations, and exported as transformers' LlamaForSequenceClassification with the same scores."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import train_word_tokenizer, write_hf_tokenizer
from llama_jax import load_reward_model  # the public API
from llama_jax.align.heads import reward_params
from llama_jax import checkpoint
from llama_jax.config import ModelConfig
from llama_jax.tokenizer import Tokenizer, chat


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
  root = tmp_path_factory.mktemp("rm")
  tok = Tokenizer(train_word_tokenizer(root, 320))
  cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16,
                    max_seq_len=256)
  params = nn.unbox(reward_params(cfg, jax.random.key(0)))
  params["score"] = jax.random.normal(jax.random.key(1), (cfg.dim,))  # a trained head is not zero
  checkpoint.save_model(str(root / "saved"), cfg, params, tok.path)
  return load_reward_model(root / "saved"), root


def test_loads_and_scores_text_and_conversations(reward_model):
  rm, _ = reward_model
  tok = rm.tokenizer
  assert "output" not in rm.params and rm.params["score"].shape == (32,)
  text = "the cat sat on a mat"
  conversation = [{"role": "user", "content": "the dog ran"}, {"role": "assistant", "content": "to a tree"}]
  scores = rm.score([text, conversation])
  expected = rm.score_tokens([tok.encode(text, bos=True, eos=True),
                              chat.get_template().encode(conversation, tok)[0]])
  np.testing.assert_allclose(scores, expected, rtol=1e-6)
  assert scores[0] != scores[1]
  # A score depends on the sequence, not on its batch-mates or the padding to a bucket.
  alone = rm.score_tokens([tok.encode(text, bos=True, eos=True)])
  np.testing.assert_allclose(alone, scores[:1], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="token ids"):
    rm.score_tokens([[1, 999]])


def test_a_language_model_is_not_a_reward_model(tmp_path, reward_model):
  from llama_jax.model import init_params
  rm, _ = reward_model
  checkpoint.save_model(str(tmp_path / "lm"), rm.config, nn.unbox(init_params(rm.config, jax.random.key(0))))
  with pytest.raises(ValueError, match="not a reward model"):
    load_reward_model(tmp_path / "lm")


def test_export_scores_equal_transformers_sequence_classifier(reward_model, tmp_path):
  torch = pytest.importorskip("torch")
  import transformers
  rm, _ = reward_model
  rm.export_hf(str(tmp_path / "hf"))
  hf = transformers.LlamaForSequenceClassification.from_pretrained(str(tmp_path / "hf"),
                                                                   dtype=torch.float32).eval()
  assert hf.config.num_labels == 1 and hf.config.pad_token_id not in (rm.tokenizer.eos_id, None)
  rng = np.random.default_rng(0)
  sequences = [[rm.tokenizer.bos_id] + rng.integers(3, 320, size=n).tolist() + [rm.tokenizer.eos_id]
               for n in (5, 17, 9, 30)]
  ours = rm.score_tokens(sequences)
  ids = np.full((len(sequences), 32), hf.config.pad_token_id)  # right-padded, as transformers reads it
  for r, s in enumerate(sequences):
    ids[r, :len(s)] = s
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != hf.config.pad_token_id)).logits
  np.testing.assert_allclose(ours, theirs[:, 0].numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_export_with_a_hugging_face_tokenizer_reads_the_answers_end(style, tmp_path):
  """Llama 3's tokenizer has no pad or unknown token and two EOS ids; ChatML's pad token is its EOS:
  the exported pad_token_id is none of the EOS ids, so transformers reads the score at the answer's
  end marker, where llama_jax reads it."""
  torch = pytest.importorskip("torch")
  import transformers
  folder = write_hf_tokenizer(tmp_path / "tok", style)
  tok = Tokenizer(str(folder))
  cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=64)
  params = nn.unbox(reward_params(cfg, jax.random.key(0)))
  params["score"] = jax.random.normal(jax.random.key(1), (cfg.dim,))
  checkpoint.save_model(str(tmp_path / "saved"), cfg, params, str(folder))
  rm = load_reward_model(tmp_path / "saved")
  rm.export_hf(str(tmp_path / "hf"))
  hf = transformers.LlamaForSequenceClassification.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
  pad = hf.config.pad_token_id
  assert pad is not None and pad not in tok.eos_ids
  conversations = [[{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog sat"}],
                   [{"role": "user", "content": "one two three four"}, {"role": "assistant", "content": "five"}]]
  template = chat.template_for(tok)
  # Up to the answer's end marker, where training reads the score (and `score` reads it): ChatML
  # renders a "\n" after <|im_end|>, a position the head never learnt from.
  encoded = [template.encode(c, tok) for c in conversations]
  sequences = [ids[:max(i for i, m in enumerate(mask) if m) + 1] for ids, mask in encoded]
  assert all(s[-1] != pad for s in sequences)
  if style == "chatml":
    assert all(len(s) < len(ids) for s, (ids, _) in zip(sequences, encoded))
    assert tok.id_to_piece(sequences[0][-1]) == "<|im_end|>"
  ours = rm.score(conversations)
  width = max(map(len, sequences))
  ids = np.full((len(sequences), width), pad)
  mask = np.zeros((len(sequences), width), np.int64)
  for r, s in enumerate(sequences):
    ids[r, :len(s)], mask[r, :len(s)] = s, 1
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  np.testing.assert_allclose(ours, theirs[:, 0].numpy(), atol=1e-5, rtol=1e-5)


def test_ppo_rollouts_stop_at_the_templates_stop_token(tmp_path, monkeypatch):
  # ChatML's <|im_end|> ends every SFT answer; in a tokenizer where it is no EOS, rollouts that
  # stopped at EOS alone ran past it (and were scored past it).
  from llama_jax.align.ppo import stop_ids
  from llama_jax.train.cli import load_config
  import json
  folder = write_hf_tokenizer(tmp_path / "tok", "chatml", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
  ends = Tokenizer(str(folder)).token_to_id("<|endoftext|>")
  (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ends}))  # as Qwen2.5's base
  tok = Tokenizer(str(folder))
  end = tok.token_to_id("<|im_end|>")
  assert end not in tok.eos_ids
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config = load_config("configs/ppo_tiny.py")
  config.data.sources.prompts.template = "chatml"
  assert stop_ids(config, tok) == [*tok.eos_ids, end]


def test_export_of_a_reward_model_writes_no_generation_config(reward_model, tmp_path):
  # A classifier generates nothing: even where its tokenizer's folder has a generation_config.json
  # (which the tokenizer's save copies), the export holds none.
  import dataclasses
  import json
  import shutil
  from llama_jax.tokenizer import load_tokenizer
  rm, _ = reward_model
  folder = tmp_path / "tokenizer"
  shutil.copytree(rm.tokenizer.folder, folder)
  (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": rm.tokenizer.eos_id}))
  dataclasses.replace(rm, tokenizer=load_tokenizer(str(folder))).export_hf(str(tmp_path / "hf"))
  assert "config.json" in os.listdir(tmp_path / "hf")
  assert "generation_config.json" not in os.listdir(tmp_path / "hf")
