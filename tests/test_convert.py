"""Checkpoint conversion against the reference: Hugging Face transformers' PyTorch LLaMA.

Tiny random `LlamaForCausalLM`s (grouped-query and plain, tied and untied heads, non-default
rope_theta, perturbed norm weights) are loaded from disk and must give transformers' logits and
greedy continuations; exports must load back into transformers; a Meta directory is written from
a transformers model by this file's own inverse of the conversion (fairscale split, interleaved
rotary rows), independently of the loader.
"""

import copy
import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import llama_jax
from llama_jax.convert import cli as convert
from llama_jax.convert import CheckpointError, hf, meta, safetensors_io

transformers.logging.set_verbosity_error()

# name -> LlamaConfig overrides; all have hidden 64, 8 heads, 2 layers
CASES = {
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=50000.0),
    "mha_untied": dict(num_key_value_heads=8, tie_word_embeddings=False, rope_theta=10000.0),
    "gqa_untied": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=500000.0),
    # Llama 3.1's rope scaling, its bands moved within 13 positions: frequencies 1 and 2 of 4 are
    # scaled and blended, 0 kept (wavelengths 6, 75, 890, 10600 against 16 and 64).
    "llama3_rope": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=20000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "linear_rope": dict(num_key_value_heads=8, tie_word_embeddings=True, rope_theta=10000.0,
                        rope_scaling={"rope_type": "linear", "factor": 3.0}),
}


def hf_model(seed=0, vocab_size=101, intermediate_size=96, **overrides):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
      num_attention_heads=8, max_position_embeddings=128, rms_norm_eps=1e-5,
      **copy.deepcopy(overrides))  # (transformers writes rope_theta into a rope_scaling it is given)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # norms start at ones; a mapping that dropped them would go unnoticed
        p.add_(0.3 * torch.randn_like(p))
  return model


def ref_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def assert_close(ours, ref, rtol=1e-5):
  # 1e-5 relative to the logits' scale, with float32 on both sides
  np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


TOKENS = np.random.default_rng(0).integers(0, 101, (2, 13))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  out = {}
  for i, (name, overrides) in enumerate(CASES.items()):
    model = hf_model(seed=i, **overrides)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    out[name] = (model, path)
  return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(hf_dirs, case):
  model, path = hf_dirs[case]
  ours = llama_jax.load(path)
  assert ours.config.tie_embeddings == CASES[case]["tie_word_embeddings"]
  assert ours.config.n_kv_heads == CASES[case]["num_key_value_heads"]
  assert ours.config.rope_theta == CASES[case]["rope_theta"]
  assert ("output" in ours.params) != ours.config.tie_embeddings
  assert ours.config.rope_scaling == CASES[case].get("rope_scaling", {}).get("rope_type", "none")
  assert_close(ours.logits(TOKENS), ref_logits(model, TOKENS))


@pytest.mark.parametrize("case", ["gqa_tied", "mha_untied", "llama3_rope"])
def test_batched_greedy_generation_equals_transformers(hf_dirs, case):
  model, path = hf_dirs[case]
  prompts = [[1, 5, 17, 42, 8, 3], [1, 99, 23, 4, 61, 7]]  # equal lengths: no padding semantics
  new = 10
  ours = llama_jax.load(path).generate(prompts, max_new_tokens=new, temperature=0.0, stop_at_eos=False)
  with torch.no_grad():
    ref = model.generate(torch.tensor(prompts), attention_mask=torch.ones(2, 6, dtype=torch.long),
                         do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                         pad_token_id=0)
  assert [list(map(int, r)) for r in ours] == ref.tolist()
  assert len(ours[0]) == 6 + new


def test_export_hf_round_trip_through_transformers(hf_dirs, tmp_path):
  model, path = hf_dirs["gqa_untied"]
  ours = llama_jax.load(path)
  out = str(tmp_path / "export")
  hf.export_hf(ours.config, ours.params, out, max_shard_bytes=100_000)  # small: several shards
  index = json.load(open(os.path.join(out, hf.SAFETENSORS_INDEX)))
  assert len(set(index["weight_map"].values())) > 1
  back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  assert back.config.rope_parameters["rope_theta"] == 500000.0
  assert back.config.num_key_value_heads == 4 and back.config.intermediate_size == 96
  assert_close(ref_logits(back, TOKENS), ref_logits(model, TOKENS))
  # and the tensors themselves are bit-identical to the original's
  orig = model.state_dict()
  for name, file in index["weight_map"].items():
    with safe_open(os.path.join(out, file), "pt") as f:
      torch.testing.assert_close(f.get_tensor(name), orig[name], rtol=0, atol=0)


@pytest.mark.slow  # three transformers saves and six reads: seconds
def test_an_export_without_a_tokenizer_keeps_the_sources_special_ids(tmp_path, caplog):
  # Llama 3's BOS/EOS are 128000/128001, not LLaMA's 1/2: a folder without tokenizer files still
  # names them in config.json and generation_config.json, and an export must write them again.
  source = tmp_path / "src"
  hf_model(bos_token_id=5, eos_token_id=[7, 8], pad_token_id=9).save_pretrained(source)
  model = transformers.GenerationConfig.from_pretrained(source)
  model.temperature, model.do_sample = 0.6, True  # a sampling default travels with the ids
  model.save_pretrained(source)

  def ids(folder):
    config = transformers.AutoConfig.from_pretrained(folder)
    generation = transformers.GenerationConfig.from_pretrained(folder)
    return ((config.bos_token_id, config.eos_token_id, config.pad_token_id),
            (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id, generation.temperature))

  expected = ((5, [7, 8], 9), (5, [7, 8], 9, 0.6))
  assert ids(source) == expected
  assert convert.main(["--input", str(source), "--output", str(tmp_path / "cli"), "--to", "hf"]) == 0
  assert ids(tmp_path / "cli") == expected
  llama_jax.load(source).export_hf(str(tmp_path / "api"))
  assert ids(tmp_path / "api") == expected
  # Through our format and back, by the command line and by the API: kept as a file of their own.
  assert convert.main(["--input", str(source), "--output", str(tmp_path / "ours")]) == 0
  assert convert.main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "back"), "--to", "hf"]) == 0
  assert ids(tmp_path / "back") == expected
  llama_jax.load(source).save(str(tmp_path / "saved"))
  llama_jax.load(str(tmp_path / "saved")).export_hf(str(tmp_path / "api_back"))
  assert ids(tmp_path / "api_back") == expected
  # Nothing to take them from: LLaMA's, said aloud.
  loaded = llama_jax.load(source)
  loaded.generation = None
  with caplog.at_level("WARNING", logger="llama_jax"):
    loaded.export_hf(str(tmp_path / "bare"))
  assert ids(tmp_path / "bare")[0] == (1, 2, None) and "LLaMA's BOS 1 and EOS 2" in caplog.text


@pytest.mark.slow
def test_generation_without_a_tokenizer_stops_at_the_checkpoints_eos(hf_dirs, tmp_path):
  # Token ids in, no tokenizer: the EOS ids are the folder's config's (were LLaMA's 2 always).
  d = _bad_dir(hf_dirs, tmp_path)
  prompt = [[1, 5, 17, 42]]
  first = llama_jax.load(str(d)).generate(prompt, max_new_tokens=1, stop_at_eos=False)[0][-1]
  assert first != 2
  for name in ("config.json", "generation_config.json"):
    cfg = json.load(open(d / name))
    cfg["eos_token_id"] = [first + 1, first]
    (d / name).write_text(json.dumps(cfg))
  assert llama_jax.load(str(d)).generate(prompt, max_new_tokens=5)[0] == prompt[0] + [first]


def test_an_export_that_fails_leaves_the_previous_export_whole(hf_dirs, tmp_path, monkeypatch):
  """An export over a previous one: cut off while writing, the previous is read as it was; cut off
  while moving its files in, the folder is an error (no config.json), not a mix of two models. A
  single-file export over a sharded one leaves no shard of it behind."""
  sharded, one = (llama_jax.load(hf_dirs[name][1]) for name in ("mha_untied", "gqa_untied"))
  out = tmp_path / "export"
  hf.export_hf(sharded.config, sharded.params, str(out), max_shard_bytes=100_000)
  before = {name: (out / name).read_bytes() for name in os.listdir(out)}
  original = safetensors_io.write_file

  def disk_full_on_the_second_shard(path, *args, **kwargs):
    if len(glob.glob(os.path.join(os.path.dirname(path), "*.safetensors"))) == 1:
      raise OSError("No space left on device")
    return original(path, *args, **kwargs)

  monkeypatch.setattr(safetensors_io, "write_file", disk_full_on_the_second_shard)
  with pytest.raises(OSError, match="No space"):
    hf.export_hf(one.config, one.params, str(out), max_shard_bytes=100_000)
  monkeypatch.undo()
  assert {name: (out / name).read_bytes() for name in os.listdir(out) if name != hf.STAGING} == before
  np.testing.assert_array_equal(llama_jax.load(str(out)).logits(TOKENS), sharded.logits(TOKENS))

  real_replace = os.replace

  def cut_before_the_config(src, dst):
    if os.path.basename(dst) == hf.CONFIG:
      raise OSError("cut off")
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", cut_before_the_config)
  with pytest.raises(OSError, match="cut off"):
    hf.export_hf(one.config, one.params, str(out))
  monkeypatch.undo()
  with pytest.raises(CheckpointError, match="export into this folder was cut off"):
    llama_jax.load(str(out))
  hf.export_hf(one.config, one.params, str(out))  # again: whole, one file, nothing left over
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
  np.testing.assert_array_equal(llama_jax.load(str(out)).logits(TOKENS), one.logits(TOKENS))


def test_export_bfloat16_with_tokenizer_through_model_api(hf_dirs, tmp_path):
  model, path = hf_dirs["gqa_tied"]
  tok = _tokenizer(tmp_path)
  ours = llama_jax.load(path, tokenizer=tok)
  out = tmp_path / "bf16"
  ours.export_hf(str(out), dtype="bfloat16")
  assert (out / "tokenizer.model").read_bytes() == open(tok, "rb").read()
  assert json.load(open(out / "config.json"))["torch_dtype"] == "bfloat16"
  back = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
  assert back.dtype == torch.bfloat16 and back.config.tie_word_embeddings
  with torch.no_grad():
    want = model.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(back.model.embed_tokens.weight, want)
  assert_close(ref_logits(back.float(), TOKENS), ref_logits(model, TOKENS), rtol=5e-2)


def _tokenizer(tmp_path):
  import sentencepiece as spm
  text = tmp_path / "text.txt"
  text.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tok"), vocab_size=60,
                                 model_type="bpe", byte_fallback=False, minloglevel=2)
  return str(tmp_path / "tok.model")


def test_pytorch_bin_weights(hf_dirs, tmp_path):
  model, path = hf_dirs["mha_untied"]
  shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
  state = model.state_dict()
  names = list(state)
  # sharded .bin with an index, as older transformers wrote them
  parts = {"pytorch_model-00001-of-00002.bin": names[:7], "pytorch_model-00002-of-00002.bin": names[7:]}
  for file, keys in parts.items():
    torch.save({k: state[k].clone() for k in keys}, tmp_path / file)
  index = {"weight_map": {k: f for f, keys in parts.items() for k in keys}}
  (tmp_path / hf.BIN_INDEX).write_text(json.dumps(index))
  assert_close(llama_jax.load(str(tmp_path)).logits(TOKENS), ref_logits(model, TOKENS))


def write_meta(model, directory, n_shards=2, vocab_size=-1):
  """Meta's layout from a transformers model: interleaved rotary rows, fairscale's split."""
  c = model.config
  h = c.hidden_size // c.num_attention_heads

  def to_interleaved(w, heads):  # Hugging Face halves -> Meta pairs: the inverse of HF's permute
    return w.view(heads, 2, h // 2, c.hidden_size).transpose(1, 2).reshape(heads * h, c.hidden_size)

  full = {"tok_embeddings.weight": model.model.embed_tokens.weight, "norm.weight": model.model.norm.weight,
          "output.weight": model.lm_head.weight, "rope.freqs": torch.ones(h // 2)}
  for i, layer in enumerate(model.model.layers):
    a, m = layer.self_attn, layer.mlp
    full.update({
        f"layers.{i}.attention.wq.weight": to_interleaved(a.q_proj.weight, c.num_attention_heads),
        f"layers.{i}.attention.wk.weight": to_interleaved(a.k_proj.weight, c.num_key_value_heads),
        f"layers.{i}.attention.wv.weight": a.v_proj.weight, f"layers.{i}.attention.wo.weight": a.o_proj.weight,
        f"layers.{i}.feed_forward.w1.weight": m.gate_proj.weight, f"layers.{i}.feed_forward.w3.weight": m.up_proj.weight,
        f"layers.{i}.feed_forward.w2.weight": m.down_proj.weight,
        f"layers.{i}.attention_norm.weight": layer.input_layernorm.weight,
        f"layers.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight,
    })
  column, row = ("wq", "wk", "wv", "w1", "w3", "output"), ("wo", "w2", "tok_embeddings")
  shards = [{} for _ in range(n_shards)]
  for name, w in full.items():
    key = name.split(".")[-2]
    pieces = (torch.chunk(w, n_shards, 0) if key in column else
              torch.chunk(w, n_shards, 1) if key in row else [w] * n_shards)
    for shard, piece in zip(shards, pieces):
      shard[name] = piece.detach().clone()
  os.makedirs(directory, exist_ok=True)
  for i, shard in enumerate(shards):
    torch.save(shard, os.path.join(directory, f"consolidated.{i:02d}.pth"))
  params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
            "n_kv_heads": c.num_key_value_heads, "vocab_size": vocab_size, "multiple_of": 16,
            "ffn_dim_multiplier": None, "norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_parameters["rope_theta"]}
  with open(os.path.join(directory, "params.json"), "w") as f:
    json.dump(params, f)


@pytest.fixture(scope="module")
def meta_case(tmp_path_factory):
  # Meta's width rule with dim 64, multiple_of 16: int(2 * 256 / 3) = 170 -> 176
  model = hf_model(seed=7, vocab_size=102, intermediate_size=176, num_key_value_heads=2, rope_theta=20000.0)
  path = str(tmp_path_factory.mktemp("meta"))
  write_meta(model, path)
  return model, path


def test_meta_two_model_parallel_shards(meta_case):
  model, path = meta_case
  ours = llama_jax.load(path)
  assert ours.config.vocab_size == 102 and ours.config.hidden_dim == 176
  assert_close(ours.logits(TOKENS), ref_logits(model, TOKENS))


@pytest.mark.parametrize("fields, context", [
    ({"norm_eps": 1e-6}, 2048),  # LLaMA 1
    ({"norm_eps": 1e-5}, 4096),  # LLaMA 2
    ({"norm_eps": 1e-5, "rope_theta": 1e6}, 16384),  # Code Llama
    ({"norm_eps": 1e-5, "rope_theta": 5e5}, 8192),  # Llama 3
    ({"norm_eps": 1e-5, "rope_theta": 5e5, "use_scaled_rope": True}, 131072),  # Llama 3.1, 3.2
    ({"norm_eps": 1e-5, "max_seq_len": 512}, 512),  # said
])
def test_meta_context_by_release(fields, context):
  # Meta's params.json does not give the context: each release's is told by what it does give.
  params = {"dim": 64, "n_layers": 2, "n_heads": 8, **fields}
  assert meta.config_from_meta(params, 101).max_seq_len == context


def test_meta_missing_shard(meta_case, tmp_path):
  _, path = meta_case
  shutil.copy(os.path.join(path, "params.json"), tmp_path)
  shutil.copy(os.path.join(path, "consolidated.00.pth"), tmp_path)
  with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth is missing"):
    meta.load_meta(str(tmp_path))
  shutil.copy(os.path.join(path, "consolidated.01.pth"), tmp_path / "consolidated.02.pth")
  with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth is missing"):
    meta.load_meta(str(tmp_path))


def test_convert_cli_round_trip(hf_dirs, meta_case, tmp_path, capsys):
  model, path = meta_case
  orbax, back = str(tmp_path / "orbax"), str(tmp_path / "hf")
  assert convert.main(["--input", path, "--output", orbax]) == 0
  assert convert.main(["--input", orbax, "--output", back, "--to", "hf"]) == 0
  assert_close(llama_jax.load(orbax).logits(TOKENS), ref_logits(model, TOKENS))
  reloaded = transformers.LlamaForCausalLM.from_pretrained(back).eval()
  assert_close(ref_logits(reloaded, TOKENS), ref_logits(model, TOKENS))
  half = str(tmp_path / "bf16")
  assert convert.main(["--input", hf_dirs["gqa_tied"][1], "--output", half, "--dtype", "bfloat16"]) == 0
  assert json.load(open(os.path.join(half, "model_config.json")))["param_dtype"] == "bfloat16"
  assert llama_jax.load(half).params["tok_embeddings"].dtype == "bfloat16"


def test_delta_make_then_apply_gives_the_tuned_weights(tmp_path):
  base = hf_model(seed=1, num_key_value_heads=2)
  tuned = hf_model(seed=2, vocab_size=103, num_key_value_heads=2)  # two tokens added in tuning
  base_dir, tuned_dir = str(tmp_path / "base"), str(tmp_path / "tuned")
  base.save_pretrained(base_dir)
  tuned.save_pretrained(tuned_dir)
  delta_dir, out_dir = str(tmp_path / "delta"), str(tmp_path / "out")
  assert convert.main(["--input", tuned_dir, "--make_delta", "--base", base_dir, "--output", delta_dir,
                       "--to", "hf"]) == 0
  # the delta itself, against torch's own arithmetic: shared rows differ, extra rows are the tuned ones
  with safe_open(os.path.join(delta_dir, "model.safetensors"), "pt") as f:
    emb = f.get_tensor("model.embed_tokens.weight")
    wq = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
  with torch.no_grad():
    torch.testing.assert_close(emb[:101], tuned.model.embed_tokens.weight[:101] - base.model.embed_tokens.weight)
    torch.testing.assert_close(emb[101:], tuned.model.embed_tokens.weight[101:], rtol=0, atol=0)
    torch.testing.assert_close(wq, tuned.model.layers[1].self_attn.q_proj.weight - base.model.layers[1].self_attn.q_proj.weight)
  assert convert.main(["--input", base_dir, "--delta", delta_dir, "--output", out_dir, "--to", "hf"]) == 0
  rebuilt = transformers.LlamaForCausalLM.from_pretrained(out_dir)
  for (name, want), got in zip(tuned.state_dict().items(), rebuilt.state_dict().values()):
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)


def test_delta_between_orbax_checkpoints(tmp_path):
  # Our own checkpoints stream one parameter at a time: make and apply a delta with every side in Orbax.
  base = hf_model(seed=3, num_key_value_heads=2)
  tuned = hf_model(seed=4, vocab_size=103, num_key_value_heads=2)
  paths = {n: str(tmp_path / n) for n in ("base_hf", "tuned_hf", "base", "tuned", "delta", "out")}
  base.save_pretrained(paths["base_hf"])
  tuned.save_pretrained(paths["tuned_hf"])
  assert convert.main(["--input", paths["base_hf"], "--output", paths["base"]]) == 0
  assert convert.main(["--input", paths["tuned_hf"], "--output", paths["tuned"]]) == 0
  assert convert.main(["--input", paths["tuned"], "--make_delta", "--base", paths["base"],
                       "--output", paths["delta"]]) == 0
  assert convert.main(["--input", paths["base"], "--delta", paths["delta"], "--output", paths["out"]]) == 0
  want, got = llama_jax.load(paths["tuned"]).params, llama_jax.load(paths["out"]).params
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  assert_close(llama_jax.load(paths["out"]).logits(TOKENS), ref_logits(tuned, TOKENS))


# ---- an existing --output: a model of the format written is replaced, anything else refused ----

def test_an_output_holding_anything_but_a_model_of_that_format_is_refused(hf_dirs, tmp_path, capsys):
  """Writing into a folder that holds another format's model (or a workdir, or other files) would
  leave two models in one folder, `llama_jax.load` reading one and transformers the other: one line
  naming what is there, nothing written. A model of the same format is replaced; --overwrite writes
  beside anything."""
  src = hf_dirs["gqa_tied"][1]
  ours, theirs, run, notes = (tmp_path / n for n in ("ours", "theirs", "run", "notes"))
  assert convert.main(["--input", src, "--output", str(ours)]) == 0
  assert convert.main(["--input", src, "--output", str(theirs), "--to", "hf"]) == 0
  (run / "checkpoints").mkdir(parents=True)
  (run / "model_config.json").write_text("{}")
  notes.mkdir()
  (notes / "notes.txt").write_text("mine")
  (tmp_path / "file").write_text("")
  for out, to, what in (
      (ours, "hf", "a llama_jax model (model_config.json, params/), not a Hugging Face checkpoint"),
      (theirs, "orbax", "a Hugging Face checkpoint (model.safetensors), not a llama_jax model"),
      (notes, "orbax", "files a llama_jax model does not have (notes.txt)"),
      (notes, "peft", "files a PEFT adapter does not have (notes.txt)")):
    before = sorted(os.listdir(out))
    capsys.readouterr()
    assert convert.main(["--input", src, "--output", str(out), "--to", to]) == 1
    err = capsys.readouterr().err
    assert err == (f"convert: error: --output {out} holds {what}: choose a new or empty directory, or "
                   "pass --overwrite to write into it anyway\n"), err
    assert sorted(os.listdir(out)) == before
  assert convert.main(["--input", src, "--output", str(tmp_path / "file")]) == 1
  assert "is a file; expected a directory" in capsys.readouterr().err
  # A training workdir, even with --overwrite: a model at its top would shadow its checkpoints.
  for flags in ([], ["--overwrite"]):
    assert convert.main(["--input", src, "--output", str(run), *flags]) == 1
    assert capsys.readouterr().err == (f"convert: error: --output {run} is a training workdir (checkpoints/): "
                                       "choose another directory\n")
    assert sorted(os.listdir(run)) == ["checkpoints", "model_config.json"]
  # The same format: re-converting replaces the model.
  other = hf_dirs["mha_untied"][1]
  assert convert.main(["--input", other, "--output", str(ours)]) == 0
  assert llama_jax.load(ours).config.n_kv_heads == 8
  assert convert.main(["--input", other, "--output", str(theirs), "--to", "hf"]) == 0
  assert transformers.LlamaConfig.from_pretrained(str(theirs)).num_key_value_heads == 8
  # --overwrite: written beside what is there, which stays.
  assert convert.main(["--input", src, "--output", str(notes), "--overwrite"]) == 0
  assert (notes / "notes.txt").read_text() == "mine" and llama_jax.load(notes).config.n_kv_heads == 2


def test_a_model_written_over_another_keeps_none_of_its_tokenizer_files(hf_dirs, tmp_path, monkeypatch):
  """A previous model's tokenizer files that the new one does not have go: its tokenizer.json would
  be read before the new tokenizer.model, its generation_config.json would add its EOS ids, and a
  model without a tokenizer would be read with the old one."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = Tokenizer(models.WordLevel({w: i for i, w in enumerate("<unk> <s> </s> the cat sat".split())},
                                     unk_token="<unk>"))
  words.pre_tokenizer = pre_tokenizers.Whitespace()
  json_dir, sp_dir = tmp_path / "json", tmp_path / "sp"  # tokenizer.json; tokenizer.model alone
  shutil.copytree(hf_dirs["gqa_tied"][1], json_dir)  # with transformers' generation_config.json
  words.save(str(json_dir / "tokenizer.json"))
  shutil.copytree(hf_dirs["mha_untied"][1], sp_dir)
  os.remove(sp_dir / hf.GENERATION_CONFIG)
  shutil.copy(_tokenizer(tmp_path), sp_dir / "tokenizer.model")
  out, hf_out, no_tokenizer = tmp_path / "out", tmp_path / "hf_out", hf_dirs["gqa_untied"][1]
  assert convert.main(["--input", str(json_dir), "--output", str(out)]) == 0
  assert {"tokenizer.json", "generation_config.json"} <= set(os.listdir(out))
  assert convert.main(["--input", str(sp_dir), "--output", str(out)]) == 0
  assert not (out / "tokenizer.json").exists() and not (out / "generation_config.json").exists()
  assert type(llama_jax.load(out).tokenizer).__name__ == "SentencePieceTokenizer"
  assert convert.main(["--input", no_tokenizer, "--output", str(out)]) == 0
  # (its own generation_config.json: the special ids of the source, which has no tokenizer to say them)
  assert sorted(os.listdir(out)) == ["generation_config.json", "model_config.json", "params"]
  assert json.loads((out / "generation_config.json").read_text()) == hf.generation_defaults(
      no_tokenizer, json.loads(open(os.path.join(no_tokenizer, "config.json")).read()))
  assert llama_jax.load(out).tokenizer is None
  # The Hugging Face export alike.
  assert convert.main(["--input", str(json_dir), "--output", str(hf_out), "--to", "hf"]) == 0
  assert "tokenizer.json" in os.listdir(hf_out)
  assert convert.main(["--input", no_tokenizer, "--output", str(hf_out), "--to", "hf"]) == 0
  assert sorted(os.listdir(hf_out)) == ["config.json", "generation_config.json", "model.safetensors"]
  # The tokenizer is swapped in with the weights: a save cut short after the swap (in the removal
  # of the old weights) leaves the new model with its own tokenizer, not the old one's.
  crashed = tmp_path / "crashed"
  assert convert.main(["--input", str(json_dir), "--output", str(crashed)]) == 0
  real_rmtree = shutil.rmtree

  def crash(path, *args, **kwargs):
    if str(path).endswith("params.previous"):
      raise KeyboardInterrupt
    return real_rmtree(path, *args, **kwargs)

  monkeypatch.setattr(shutil, "rmtree", crash)
  with pytest.raises(KeyboardInterrupt):
    convert.main(["--input", str(sp_dir), "--output", str(crashed)])
  monkeypatch.undo()
  assert not (crashed / "tokenizer.json").exists() and (crashed / "tokenizer.model").exists()
  assert type(llama_jax.load(crashed).tokenizer).__name__ == "SentencePieceTokenizer"


# ---- bad input: one clear error naming the file, field or tensor ----

def _bad_dir(hf_dirs, tmp_path, case="gqa_untied"):
  src = hf_dirs[case][1]
  dst = tmp_path / "bad"
  shutil.copytree(src, dst)
  return dst


def test_cli_missing_path_is_one_line_without_traceback(tmp_path, capsys):
  assert convert.main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "nope" in err and "Traceback" not in err


def _safetensors_with_header(path, header: dict) -> None:
  import struct
  raw = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)


@pytest.mark.parametrize("damage, message", [
    ("config_list", "config.json: not a model config (a JSON list, not an object)"),
    ("offsets_strings", "tensor x: its header entry is not {dtype, shape, data_offsets}"),
    ("header_list", "not a safetensors file (its header is not a JSON object)"),
    ("meta_without_dim", "params.json: missing field 'dim'"),
    ("saved_without_params", "model_config.json but no params/ beside it"),
])
def test_malformed_files_are_one_line_naming_them(hf_dirs, meta_case, tmp_path, capsys, damage, message):
  if damage == "config_list":
    d = _bad_dir(hf_dirs, tmp_path)
    (d / "config.json").write_text("[1, 2]")
  elif damage in ("offsets_strings", "header_list"):
    d = _bad_dir(hf_dirs, tmp_path)
    header = ({"x": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}} if damage == "offsets_strings"
              else [1, 2])
    _safetensors_with_header(d / "model.safetensors", header)
  elif damage == "meta_without_dim":
    d = tmp_path / "meta"
    shutil.copytree(meta_case[1], d)
    params = json.load(open(d / "params.json"))
    del params["dim"]
    (d / "params.json").write_text(json.dumps(params))
  else:
    d = tmp_path / "saved"
    d.mkdir()
    (d / "model_config.json").write_text("{}")
  assert convert.main(["--input", str(d), "--output", str(tmp_path / "out"), "--to", "hf"]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


def test_other_architecture(hf_dirs, tmp_path, capsys):
  d = _bad_dir(hf_dirs, tmp_path)
  cfg = json.load(open(d / "config.json"))
  cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r"config\.json: model_type 'gpt2'"):
    llama_jax.load(str(d))
  assert convert.main(["--input", str(d), "--output", str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "gpt2" in err
  # A LLaMA with a classifier's head (a reward model's export) is named as one, not as "no LLaMA".
  cfg.update(model_type="llama", architectures=["LlamaForSequenceClassification"])
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="a LLaMA with the head of LlamaForSequenceClassification, "
                                            "not a language model"):
    llama_jax.load(str(d))


def test_rope_scaling_survives_an_export(hf_dirs, tmp_path):
  # Both ways transformers reads it (rope_parameters, and rope_scaling for transformers 4), and the
  # logits of the export.
  for case in ("llama3_rope", "linear_rope"):
    model, path = hf_dirs[case]
    out = tmp_path / case
    llama_jax.load(path).export_hf(str(out))
    written = json.load(open(out / "config.json"))
    expected = CASES[case]["rope_scaling"]
    assert written["rope_scaling"] == expected
    assert written["rope_parameters"] == {**expected, "rope_theta": CASES[case]["rope_theta"]}
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert back.config.rope_parameters == model.config.rope_parameters
    assert llama_jax.load(str(out)).config == llama_jax.load(path).config  # and read again by us
    assert_close(ref_logits(back, TOKENS), ref_logits(model, TOKENS))


def test_meta_scaled_rope_is_llama_3_1s(tmp_path, caplog):
  # Meta's use_scaled_rope: factor 8, high-frequency factor 4 (llama-models' defaults), unless
  # params.json gives them; Llama 3.2's 32 said in the file.
  for factor in (None, 32.0):
    scaling = {"rope_type": "llama3", "factor": factor or 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    model = hf_model(seed=3, vocab_size=102, intermediate_size=176, num_key_value_heads=2, rope_theta=20000.0,
                     rope_scaling=scaling)
    path = tmp_path / f"meta{factor}"
    write_meta(model, path)
    params = json.load(open(path / "params.json"))
    params.update(use_scaled_rope=True, **({"rope_scaling_factor": factor} if factor else {}))
    (path / "params.json").write_text(json.dumps(params))
    caplog.clear()
    with caplog.at_level("WARNING", logger="llama_jax"):
      ours = llama_jax.load(str(path))
    assert ("Llama 3.2" in caplog.text) == (factor is None)
    assert (ours.config.rope_scaling, ours.config.rope_scaling_factor) == ("llama3", factor or 8.0)
    assert_close(ours.logits(TOKENS), ref_logits(model, TOKENS))


@pytest.mark.parametrize("field,value,match", [
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "rope scaling of type 'dynamic'"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, "rope scaling of type 'yarn'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 2.0}, "llama3 rope scaling without 'low_freq_factor'"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, None),  # read below

    ("attention_bias", True, "attention_bias"),
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    ("head_dim", 16, "head_dim 16"),
])
def test_unsupported_features(hf_dirs, tmp_path, field, value, match):
  d = _bad_dir(hf_dirs, tmp_path)
  cfg = json.load(open(d / "config.json"))
  cfg[field] = value
  if match is None:  # two rope scalings that disagree
    cfg["rope_scaling"], match = {"rope_type": "linear", "factor": 4.0}, "rope_parameters and rope_scaling disagree"
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=match):
    hf.load_hf(str(d))


def test_hidden_act_swish_is_silu(hf_dirs, tmp_path):
  # transformers' ACT2FN maps "swish" to the same SiLU: such a config is a LLaMA.
  model, _ = hf_dirs["gqa_untied"]
  d = _bad_dir(hf_dirs, tmp_path)
  cfg = json.load(open(d / "config.json"))
  (d / "config.json").write_text(json.dumps({**cfg, "hidden_act": "swish"}))
  assert_close(llama_jax.load(str(d)).logits(TOKENS), ref_logits(transformers.LlamaForCausalLM.from_pretrained(d).eval(), TOKENS))
  assert_close(llama_jax.load(str(d)).logits(TOKENS), ref_logits(model, TOKENS))


def test_missing_shard_named_by_index(hf_dirs, tmp_path):
  ours = llama_jax.load(hf_dirs["mha_untied"][1])
  out = tmp_path / "sharded"
  hf.export_hf(ours.config, ours.params, str(out), max_shard_bytes=100_000)
  shards = sorted(set(json.load(open(out / hf.SAFETENSORS_INDEX))["weight_map"].values()))
  assert len(shards) > 2
  os.remove(out / shards[1])
  with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: names shard {shards[1]}, which is missing"):
    llama_jax.load(str(out))


def test_wrong_shape_and_missing_tensor(hf_dirs, tmp_path):
  model, _ = hf_dirs["gqa_untied"]
  d = _bad_dir(hf_dirs, tmp_path)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:, :32]
  specs = [(k, v.shape, v.dtype) for k, v in state.items()]
  safetensors_io.write_file(str(d / "model.safetensors"), specs, lambda k: state[k])
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.1\.mlp\.up_proj\.weight "
                                            r"has shape \(96, 32\), expected \(96, 64\)"):
    llama_jax.load(str(d))
  del state["model.layers.1.mlp.up_proj.weight"]
  specs = [(k, v.shape, v.dtype) for k, v in state.items()]
  safetensors_io.write_file(str(d / "model.safetensors"), specs, lambda k: state[k])
  with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
    llama_jax.load(str(d))


def test_safetensors_writer_is_read_by_the_library(tmp_path):
  import ml_dtypes
  rng = np.random.default_rng(0)
  arrays = {"a": rng.normal(size=(3, 5)).astype(np.float32),
            "b": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16), "c": np.arange(6, dtype=np.int64).reshape(2, 3)}
  file = str(tmp_path / "x.safetensors")
  safetensors_io.write_file(file, [(k, v.shape, v.dtype) for k, v in arrays.items()], arrays.__getitem__)
  with safe_open(file, "pt") as f:
    assert f.get_tensor("b").dtype == torch.bfloat16
    np.testing.assert_array_equal(f.get_tensor("b").float().numpy(), arrays["b"].astype(np.float32))
    np.testing.assert_array_equal(f.get_tensor("a").numpy(), arrays["a"])
  back = dict(safetensors_io.iter_tensors(file))
  for k, v in arrays.items():
    np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize("to", ["orbax", "hf"])
def test_a_bad_tokenizer_fails_before_any_weight_is_written(hf_dirs, tmp_path, capsys, to):
  d = _bad_dir(hf_dirs, tmp_path)
  (d / "tokenizer.json").write_text("{not json")
  out = tmp_path / "out"
  assert convert.main(["--input", str(d), "--output", str(out), "--to", to]) == 1
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "tokenizer.json" in err
  assert not out.exists() or not any(out.iterdir())  # nothing half-written for a loader to pick up


def test_a_save_cut_off_in_its_swap_is_named_as_one(hf_dirs, tmp_path, monkeypatch, capsys):
  # Between setting the old weights aside and moving the new ones in, the folder has no params/:
  # readers say the save was cut off, not that the folder is no checkpoint.
  src, out = hf_dirs["gqa_tied"][1], tmp_path / "out"
  assert convert.main(["--input", src, "--output", str(out)]) == 0
  real_rename = os.rename

  def crash(source, target, *args, **kwargs):
    if str(target).endswith(os.sep + "params"):
      raise KeyboardInterrupt
    return real_rename(source, target, *args, **kwargs)

  monkeypatch.setattr(os, "rename", crash)
  with pytest.raises(KeyboardInterrupt):
    convert.main(["--input", src, "--output", str(out)])
  monkeypatch.undo()
  with pytest.raises(CheckpointError, match="a save into this folder was cut off"):
    llama_jax.load(str(out))
  assert convert.main(["--input", src, "--output", str(out)]) == 0  # saving again mends it
  assert llama_jax.load(str(out)).config.n_kv_heads == hf_dirs["gqa_tied"][0].config.num_key_value_heads


def test_a_meta_llama3_download_converts_with_its_tiktoken_tokenizer(tmp_path):
  # Meta's Llama 3 layout: params.json with use_scaled_rope, consolidated.NN.pth, and a tokenizer.model
  # of tiktoken ranks. It loads with its tokenizer, and its Hugging Face export reads back in
  # transformers with the same ids and logits.
  from conftest import write_hf_tokenizer
  from test_hf_tokenizer import _tiktoken_file
  path = tmp_path / "meta"
  # (beside the weights' folder, one level up, where Meta's downloads put it)
  ranks = _tiktoken_file(write_hf_tokenizer(tmp_path / "bpe", "llama3"), tmp_path / "tokenizer.model")
  vocab = len(ranks) + 256
  model = hf_model(seed=5, vocab_size=vocab, intermediate_size=176, num_key_value_heads=2, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
  write_meta(model, path)
  params = json.loads((path / "params.json").read_text())
  (path / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True, "rope_scaling_factor": 8.0}))
  ours = llama_jax.load(str(path))
  assert type(ours.tokenizer).__name__ == "MetaLlama3Tokenizer"
  ids = [ours.tokenizer.encode("the cat sat on the mat")]
  assert_close(ours.logits(np.array(ids)), ref_logits(model, ids))
  assert convert.main(["--input", str(path), "--output", str(tmp_path / "hf"), "--to", "hf"]) == 0
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  assert theirs("the cat sat on the mat")["input_ids"] == ids[0]
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
  assert_close(ref_logits(back, ids), ref_logits(model, ids))
