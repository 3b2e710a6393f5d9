"""Tokenizer tools: `python -m llama_jax.tokenizer train` (LLaMA's sentencepiece settings) and
`extend` (merging a second model's pieces, resizing a checkpoint's embedding and output rows)."""

import json
import os
import random

import flax.linen as nn
import jax
import numpy as np
import pytest

import llama_jax
from llama_jax.config import ModelConfig
from llama_jax.model import init_params
from llama_jax.tokenizer import Tokenizer
from llama_jax.tokenizer.__main__ import main

LATIN = "the of and river stone cloud paper light north water fire green small quick".split()
GREEK = "λόγος θάλασσα ποταμός ουρανός φως νερό πέτρα σύννεφο χαρτί βορράς".split()


def corpus(words, n, seed):
  rng = random.Random(seed)
  return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) + f" {rng.randint(0, 99999)}"
          for _ in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  with open(d / "latin.jsonl", "w") as f:
    for line in corpus(LATIN, 300, 0):
      f.write(json.dumps({"text": line}) + "\n")
  (d / "latin.txt").write_text("\n".join(corpus(LATIN, 50, 1)))
  (d / "greek.txt").write_text("\n".join(corpus(GREEK, 400, 2)))
  assert main(["train", "--input", str(d / "latin.*"), "--vocab_size", "300",
               "--output", str(d / "base"), "--num_threads", "1"]) == 0
  assert main(["train", "--input", str(d / "greek.txt"), "--vocab_size", "400",
               "--output", str(d / "greek"), "--num_threads", "1"]) == 0
  assert main(["extend", "--base", str(d / "base.model"), "--add", str(d / "greek.model"),
               "--output", str(d / "merged.model")]) == 0
  return d


def test_train_uses_llama_conventions(models):
  tok = Tokenizer(models / "base.model")
  assert tok.vocab_size == 300
  assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.sp.pad_id()) == (0, 1, 2, -1)
  text = "river 2024 日本"
  ids = tok.encode(text, bos=True, eos=True)
  assert ids[0] == 1 and ids[-1] == 2
  pieces = [tok.id_to_piece(i) for i in ids[1:-1]]
  assert [p for p in pieces if p.strip("▁").isdigit()] == ["2", "0", "2", "4"]  # split digits
  assert "<0xE6>" in pieces  # unseen characters fall back to UTF-8 bytes, never <unk>
  assert 0 not in ids and tok.decode(ids) == text


def test_train_errors_are_one_line(tmp_path, capsys):
  assert main(["train", "--input", str(tmp_path / "none-*.jsonl"), "--vocab_size", "300",
               "--output", str(tmp_path / "x")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "none-*.jsonl" in err and "Traceback" not in err


def test_character_coverage_reaches_sentencepiece(tmp_path, capsys):
  """300 rare CJK characters (1% of the text): at LLaMA's coverage each needs a piece of its own, more
  than a vocabulary of 300 holds, and SentencePiece's error names --character_coverage; at 0.98 they
  are left to byte pieces and training succeeds."""
  text = tmp_path / "rare.txt"
  text.write_text("\n".join(corpus(LATIN, 300, 0) + ["x" + chr(0x4E00 + i) for i in range(300)]))
  argv = ["train", "--input", str(text), "--vocab_size", "300", "--num_threads", "1"]
  assert main([*argv, "--output", str(tmp_path / "default")]) == 1
  err = capsys.readouterr().err
  assert "smaller than required_chars" in err and "--character_coverage" in err, err
  assert main([*argv, "--output", str(tmp_path / "lower"), "--character_coverage", "0.98"]) == 0
  tok = Tokenizer(tmp_path / "lower.model")
  assert [tok.id_to_piece(i) for i in tok.encode("丁")][-3:] == ["<0xE4>", "<0xB8>", "<0x81>"]
  capsys.readouterr()
  assert main([*argv, "--output", str(tmp_path / "x"), "--character_coverage", "0.5"]) == 1
  err = capsys.readouterr().err
  assert err == "error: character_coverage must lie in [0.98, 1] (SentencePiece's bounds), got 0.5\n", err


def test_extend_adds_the_missing_pieces(models):
  base, greek, merged = (Tokenizer(models / f"{n}.model") for n in ("base", "greek", "merged"))
  base_pieces = [base.id_to_piece(i) for i in range(base.vocab_size)]
  assert [merged.id_to_piece(i) for i in range(base.vocab_size)] == base_pieces  # ids kept
  new = {merged.id_to_piece(i) for i in range(base.vocab_size, merged.vocab_size)}
  greek_pieces = {greek.id_to_piece(i) for i in range(greek.vocab_size) if not greek.sp.is_control(i)
                  and not greek.sp.is_byte(i) and not greek.sp.is_unknown(i)}
  assert new == greek_pieces - set(base_pieces) and len(new) > 50
  text = "θάλασσα ποταμός φως"
  ids = merged.encode(text, bos=False)
  assert all(i >= base.vocab_size or merged.id_to_piece(i) in base_pieces for i in ids)
  assert any(i >= base.vocab_size for i in ids) and len(ids) < len(base.encode(text, bos=False)) / 3
  assert merged.decode(ids) == text
  latin = "the quick river and the green stone 42"
  # As before where no new piece joins two of the base's (none of the Greek ones can here).
  assert merged.encode(latin) == base.encode(latin)


@pytest.mark.slow
def test_extend_resizes_checkpoint_rows_with_the_mean(models, tmp_path, capsys):
  base = Tokenizer(models / "base.model")
  cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=base.vocab_size, multiple_of=16, max_seq_len=32)
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  llama_jax.Model(cfg, params, base).save(str(tmp_path / "ckpt"))
  assert main(["extend", "--base", str(models / "base.model"), "--add", str(models / "greek.model"),
               "--output", str(tmp_path / "merged.model"), "--checkpoint", str(tmp_path / "ckpt"),
               "--checkpoint_output", str(tmp_path / "resized")]) == 0
  out = llama_jax.load(str(tmp_path / "resized"))
  v_new = Tokenizer(tmp_path / "merged.model").vocab_size
  assert out.config.vocab_size == out.tokenizer.vocab_size == v_new > base.vocab_size
  emb, head = np.asarray(out.params["tok_embeddings"]), np.asarray(out.params["output"])
  old_emb, old_head = np.asarray(params["tok_embeddings"]), np.asarray(params["output"])
  assert emb.shape == (v_new, 32) and head.shape == (32, v_new)
  np.testing.assert_array_equal(emb[:base.vocab_size], old_emb)
  np.testing.assert_array_equal(head[:, :base.vocab_size], old_head)
  np.testing.assert_allclose(emb[base.vocab_size:], np.broadcast_to(old_emb.mean(0), (v_new - base.vocab_size, 32)), rtol=1e-6)
  np.testing.assert_allclose(head[:, base.vocab_size:].T, np.broadcast_to(old_head.mean(1), (v_new - base.vocab_size, 32)), rtol=1e-6)
  # The resized model runs on the new ids.
  assert out.logits(np.array([[1, v_new - 1]])).shape == (1, 2, v_new)
  # A checkpoint whose vocabulary is not the base's is refused in one line.
  capsys.readouterr()
  assert main(["extend", "--base", str(models / "greek.model"), "--add", str(models / "base.model"),
               "--output", str(tmp_path / "m2.model"), "--checkpoint", str(tmp_path / "ckpt"),
               "--checkpoint_output", str(tmp_path / "r2")]) == 1
  assert "is not the base tokenizer's" in capsys.readouterr().err
  assert not (tmp_path / "m2.model").exists()  # refused before the merged tokenizer is written
  # A quantized checkpoint has no float rows to take the mean of: refused, nothing written.
  from llama_jax.quantize.grid import Grid
  from llama_jax.quantize.layers import Options, quantize_params
  quantized, _ = quantize_params(cfg, params, Grid(8, 0, True), Options("rtn"))
  llama_jax.Model(cfg, quantized, base, quantization={"method": "rtn", "bits": 8}).save(
      str(tmp_path / "quantized"))
  assert main(["extend", "--base", str(models / "base.model"), "--add", str(models / "greek.model"),
               "--output", str(tmp_path / "mq.model"), "--checkpoint", str(tmp_path / "quantized"),
               "--checkpoint_output", str(tmp_path / "rq")]) == 1
  assert "holds quantized weights; extend the float checkpoint" in capsys.readouterr().err
  assert not (tmp_path / "mq.model").exists() and not (tmp_path / "rq").exists()
  # --checkpoint_output holding something else is refused before anything is written.
  (tmp_path / "occupied").mkdir()
  (tmp_path / "occupied" / "notes.txt").write_text("mine")
  assert main(["extend", "--base", str(models / "base.model"), "--add", str(models / "greek.model"),
               "--output", str(tmp_path / "m3.model"), "--checkpoint", str(tmp_path / "ckpt"),
               "--checkpoint_output", str(tmp_path / "occupied")]) == 1
  assert "holds files a llama_jax model does not have (notes.txt)" in capsys.readouterr().err
  assert not (tmp_path / "m3.model").exists() and os.listdir(tmp_path / "occupied") == ["notes.txt"]
  assert main(["extend", "--base", str(models / "base.model"), "--add", str(models / "greek.model"),
               "--output", str(tmp_path / "m3.model"), "--checkpoint", str(tmp_path / "ckpt"),
               "--checkpoint_output", str(tmp_path / "occupied"), "--overwrite"]) == 0
  assert llama_jax.load(str(tmp_path / "occupied")).config.vocab_size == v_new


def test_export_for_transformers_gives_sentencepiece_ids(models, tmp_path):
  import transformers

  from llama_jax.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
  tok = Tokenizer(models / "merged.model")
  assert isinstance(tok, SentencePieceTokenizer)
  tok.save(tmp_path, for_transformers=True)
  theirs, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
  assert isinstance(ours, HFTokenizer)
  rng = random.Random(3)
  pieces = LATIN + GREEK + ["日本語", "😀", " ", "  ", "\t", "\n", "    ", "2024", "x1", "(", ")", ":"]
  texts = ["the river", " leading", "   three spaces", "tabs\tand\n\nnewlines", "", " ", "λόγος 日本 😀🎉"]
  texts += ["".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(1, 30)))
            for _ in range(400)]
  for text in texts:
    ids = tok.encode(text)
    assert theirs(text)["input_ids"] == ids == ours.encode(text), text
    assert theirs.decode(ids, skip_special_tokens=True) == tok.decode(ids) == ours.decode(ids), text
  assert (theirs.bos_token_id, theirs.eos_token_id) == (tok.bos_id, tok.eos_id)
  # The folder's own SentencePiece model is still there for sentencepiece readers.
  assert Tokenizer(tmp_path / "tokenizer.model").encode("the river") == tok.encode("the river")


def test_sentencepiece_add_eos_token_is_kept_for_transformers_but_eos_comes_only_when_asked(models, tmp_path):
  # A tokenizer.model folder whose config asks for EOS after the text (transformers' LlamaTokenizer
  # then appends it with the special tokens). Here EOS comes with eos=True only, so a prompt or an
  # evaluation context never ends in it; the folder's save and its tokenizer.json export keep the
  # setting for transformers, and read back the same.
  import shutil

  import transformers

  from llama_jax.evaluate import choice
  from llama_jax.tokenizer import load_tokenizer
  shutil.copy(models / "base.model", tmp_path / "tokenizer.model")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
       "add_bos_token": True, "add_eos_token": True}))
  ours, theirs = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
  texts = ["the river", "", "river of the sea"]  # (no leading space: transformers' own conversion of a
  # tokenizer.model drops its "▁", see SentencePieceTokenizer.save)
  assert [ours.encode(t, eos=True) for t in texts] == [theirs(t)["input_ids"] for t in texts]
  assert all(ours.encode(t) == ours.encode(t, eos=True)[:-1] for t in texts)
  assert ours.encode_batch(texts) == [ours.encode(t) for t in texts]
  context, continuation = choice.encode_pair(ours, "river of", " the sea")
  assert ours.eos_id not in context + continuation and context + continuation == ours.encode("river of the sea")
  texts.append(" leading")
  ours.save(tmp_path / "export", for_transformers=True)
  exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
  assert [exported(t)["input_ids"] for t in texts] == [ours.encode(t, eos=True) for t in texts]
  again = load_tokenizer(tmp_path / "export")
  assert [again.encode(t) for t in texts] == [ours.encode(t) for t in texts]
  assert again.encode_batch(texts, eos=True) == [ours.encode(t, eos=True) for t in texts]


def test_sentencepiece_reads_special_strings_only_with_offsets(models):
  tok = Tokenizer(models / "base.model")
  text = "the river</s>stone"
  assert tok.eos_id not in tok.encode(text, bos=False)  # sentencepiece: "</s>" is text
  tokens = tok.encode_with_offsets(text)
  assert [i for i, _, _ in tokens].count(tok.eos_id) == 1
  assert all(text[b:e] == "</s>" for i, b, e in tokens if i == tok.eos_id)
  assert "".join(text[b:e] for _, b, e in tokens).replace(" ", "") == text.replace(" ", "")
