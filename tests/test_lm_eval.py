"""The lm-evaluation-harness adapter against transformers on a tiny random LLaMA: loglikelihood,
loglikelihood_rolling (over lm-eval's own rolling windows) and greedy generate_until; and an
end-to-end run of lm-eval's command line on a task file on disk (no download)."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from conftest import xla_flags

from llama_jax.evaluate import lm_eval_harness
from test_evaluate import REPO, hf_model, sp_path  # noqa: F401  (fixtures: the same tiny model)


def _instances(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _torch_logprobs(model, ids):
  """log p(ids[t] | ids[:t]) for t >= 1, in float64."""
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].double()
  logp = torch.log_softmax(logits, -1)
  return np.array([float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]), logits.argmax(-1).numpy()


@pytest.fixture(scope="module")
def lm(hf_model):
  return lm_eval_harness.LlamaJaxLM(path=hf_model[0], batch_size="4")


def test_registered_under_llama_jax():
  assert get_model("llama_jax") is lm_eval_harness.LlamaJaxLM


def test_loglikelihood_matches_transformers(lm, hf_model):
  _, torch_model = hf_model
  pairs = [("the cat sat on the", " mat"), ("the cat ", "sat on"), ("a dog", " ran far away")]
  ours = lm.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
  sp = lm.tok.sp
  for (context, continuation), (ll, greedy) in zip(pairs, ours):
    if context.endswith(" "):  # lm-eval moves the context's trailing space to the continuation
      context, continuation = context[:-1], " " + continuation
    whole = [1] + sp.encode(context + continuation)
    n_ctx = 1 + len(sp.encode(context))
    logps, argmax = _torch_logprobs(torch_model, whole)
    np.testing.assert_allclose(ll, logps[n_ctx - 1:].sum(), rtol=1e-4)
    assert greedy == all(argmax[t - 1] == whole[t] for t in range(n_ctx, len(whole)))


def test_the_split_is_lm_evals_encode_pair(lm):
  # lm-eval's own TemplateLM._encode_pair over our tokenizer (BOS first): the context encoded alone,
  # the continuation the whole's tokens past it, also where a piece spans the boundary.
  from types import SimpleNamespace

  from lm_eval.api.model import TemplateLM

  from llama_jax.evaluate import choice
  theirs = SimpleNamespace(backend="causal", tok_encode=lambda text: lm.tok.encode(text, bos=True))
  pairs = [("the cat sat on the", " mat"), ("the cat ", "sat on"), ("the ca", "t sat"), ("a do", "g ran"),
           ("the mat", "s and the dog"), ("ran far", " away  ")]
  spans = 0
  for context, continuation in pairs:
    expected = TemplateLM._encode_pair(theirs, context, continuation)
    ours = choice.encode_pair(lm.tok, context, continuation)
    whole = lm.tok.encode(context + continuation, bos=True)
    if expected[1]:
      assert ours == expected, (context, continuation)
      spans += whole[:len(expected[0])] != expected[0]
    else:  # the context alone takes as many tokens as the whole: lm-eval scores nothing (and fails)
      assert ours == (whole[:-1], whole[-1:]), (context, continuation)
  assert spans  # a pair whose boundary is inside a piece was among them


def test_an_empty_continuation_is_certain(lm):
  out = lm.loglikelihood(_instances("loglikelihood", [("the cat", ""), ("the cat", " sat"), ("", "")]),
                         disable_tqdm=True)
  assert out[0] == (0.0, True) == out[2] and out[1][0] < 0


def test_generate_until_reads_lm_evals_generation_arguments(lm):
  # The token budget under each of lm-eval's names; a temperature samples unless do_sample=False;
  # a budget that leaves no room for the prompt is refused (as lm-eval's HFLM refuses it).
  def run(**kwargs):
    return lm.generate_until(_instances("generate_until", [("the cat sat on", {"until": [], **kwargs})]),
                             disable_tqdm=True)[0]
  greedy, short = run(max_gen_toks=8), run(max_gen_toks=2)
  assert greedy.startswith(short) and len(short) < len(greedy)
  assert all(run(**{name: 2}) == short for name in ("max_new_tokens", "max_tokens", "max_completion_tokens"))
  assert run(max_gen_toks=8, temperature=5.0) == run(max_gen_toks=8, temperature=5.0, do_sample=True) != greedy
  assert run(max_gen_toks=8, temperature=5.0, do_sample=False) == greedy
  with pytest.raises(ValueError, match="no room for a prompt"):
    run(max_gen_toks=lm.max_length)


class _NoBos:
  """The tokenizer without a BOS token (as many tokenizer.json files are): EOS is the prefix token."""

  def __init__(self, tok):
    self._tok, self.bos_id = tok, None

  def encode(self, text, bos=False):
    return self._tok.encode(text, bos=False)

  def __getattr__(self, name):
    return getattr(self._tok, name)


def test_an_empty_context_is_scored_after_the_prefix_token(lm, hf_model):
  _, torch_model = hf_model
  no_bos = lm_eval_harness.LlamaJaxLM(model=dataclasses.replace(lm.model, tokenizer=_NoBos(lm.tok)),
                                      batch_size=4)
  assert no_bos._prefix_token == lm.tok.eos_id
  (ll, _), = no_bos.loglikelihood(_instances("loglikelihood", [("", "the cat sat")]), disable_tqdm=True)
  ids = [lm.tok.eos_id] + lm.tok.sp.encode("the cat sat")
  np.testing.assert_allclose(ll, _torch_logprobs(torch_model, ids)[0].sum(), rtol=1e-4)
  # With BOS, as before: the continuation after BOS.
  (ll, _), = lm.loglikelihood(_instances("loglikelihood", [("", "the cat sat")]), disable_tqdm=True)
  np.testing.assert_allclose(ll, _torch_logprobs(torch_model, [1] + lm.tok.sp.encode("the cat sat"))[0].sum(),
                             rtol=1e-4)


def test_loglikelihood_rolling_matches_transformers(hf_model):
  directory, torch_model = hf_model
  text = " ".join(["the cat sat on the mat and the dog ran far away from home"] * 4)
  lm = lm_eval_harness.LlamaJaxLM(path=directory, batch_size=4, max_length=16)
  ours = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,), ("a dog",)]),
                                  disable_tqdm=True)
  for string, value in zip((text, "a dog"), ours):
    tokens = lm.tok.sp.encode(string)
    ref = 0.0
    windows = lm_utils.get_rolling_token_windows(tokens, 1, 16, 1)
    for context, predicted in map(lm_utils.make_disjoint_window, windows):
      logps, _ = _torch_logprobs(torch_model, list(context) + list(predicted))
      ref += logps[len(context) - 1:].sum()
    np.testing.assert_allclose(value, ref, rtol=1e-4)
  assert len(lm.tok.sp.encode(text)) > 3 * 16  # several windows were used
  # One window when the text fits: the plain log-likelihood of the text after BOS.
  np.testing.assert_allclose(ours[1], _torch_logprobs(torch_model, [1] + lm.tok.sp.encode("a dog"))[0].sum(),
                             rtol=1e-4)


@pytest.mark.slow
def test_generate_until_is_greedy_and_stops(lm, hf_model):
  _, torch_model = hf_model
  contexts = ["the cat sat on", "a dog ran"]
  free = lm.generate_until(_instances("generate_until", [(c, {"until": [], "max_gen_toks": 6})
                                                        for c in contexts]), disable_tqdm=True)
  for context, text in zip(contexts, free):
    prompt = [1] + lm.tok.sp.encode(context)
    with torch.no_grad():
      ids = torch_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0].tolist()
    new = ids[len(prompt):]
    new = new[:new.index(2)] if 2 in new else new  # both stop at EOS
    assert text == lm.tok.sp.decode(prompt[1:] + new)[len(context):]
  stop = free[0][len(free[0]) // 2]  # a character from the middle of the free continuation
  cut = lm.generate_until(_instances("generate_until", [(contexts[0], {"until": [stop], "max_gen_toks": 6})]),
                          disable_tqdm=True)[0]
  assert cut == free[0][:free[0].index(stop)]


@pytest.mark.slow
def test_lm_eval_command_line_runs_a_task_on_disk(lm, tmp_path):
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"context": "the cat sat on the", "choices": [" mat", " river"],
                                      "label": i % 2}) + "\n" for i in range(4)))
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
      "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
      f"    test: {docs}\ntest_split: test\noutput_type: multiple_choice\n"
      'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
      'target_delimiter: ""\nmetric_list:\n  - metric: acc\n')
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
  out = subprocess.run(
      [sys.executable, "-m", "llama_jax.evaluate.lm_eval_harness", "--model", "llama_jax", "--model_args",
       f"path={os.path.dirname(lm.tok.path)}", "--tasks", "tiny_mc", "--include_path",
       str(tmp_path / "tasks"), "--batch_size", "4", "--output_path", str(tmp_path / "out")],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  results = [p for p in (tmp_path / "out").rglob("results*.json")]
  acc = json.loads(results[0].read_text())["results"]["tiny_mc"]["acc,none"]
  assert acc == 0.5  # the same context, labels alternating: one choice is always picked


def test_tokenizer_json_without_bos_matches_transformers(tmp_path):
  # A ChatML-style tokenizer.json adds no BOS: the rolling windows start from EOS (lm-eval's HFLM's
  # prefix token then), and the text's ids are transformers'.
  import transformers
  from conftest import write_hf_tokenizer
  folder = write_hf_tokenizer(tmp_path, "chatml", tokenizer_class="PreTrainedTokenizerFast", bos_token=...)
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
  model.save_pretrained(folder)
  lm = lm_eval_harness.LlamaJaxLM(path=str(folder), batch_size=4, max_length=16)
  assert lm.tok.bos_id is None is theirs.bos_token_id and not lm.tok.add_bos
  text = "你好 the cat sat on a mat 😀 and the dog ran to the big red tree house"
  [ours] = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
  tokens = theirs(text)["input_ids"]
  assert lm.tok.encode(text, bos=False) == tokens and len(tokens) > 16
  ref = 0.0
  for context, predicted in map(lm_utils.make_disjoint_window,
                                lm_utils.get_rolling_token_windows(tokens, theirs.eos_token_id, 16, 1)):
    ref += _torch_logprobs(model, list(context) + list(predicted))[0][len(context) - 1:].sum()
  np.testing.assert_allclose(ours, ref, rtol=1e-4)


def test_max_length_beyond_the_context_is_refused(lm):
  # The model's context is 64 positions: more would score positions it never trained on.
  for max_length in (65, 0):
    with pytest.raises(ValueError, match=rf"max_length must lie in \[1, 64\].*got {max_length}"):
      lm_eval_harness.LlamaJaxLM(model=lm.model, max_length=max_length)
  assert lm_eval_harness.LlamaJaxLM(model=lm.model).max_length == 64


def test_a_long_request_keeps_its_end_as_hf_does(lm, hf_model):
  # lm-eval's HFLM scores (context + continuation)[-(max_length + 1):]: the context loses its start.
  _, torch_model = hf_model
  short = lm_eval_harness.LlamaJaxLM(model=lm.model, batch_size=4, max_length=16)
  context, continuation = " ".join(["the cat sat on the mat"] * 6), " and the dog ran"
  (ll, greedy), = short.loglikelihood(_instances("loglikelihood", [(context, continuation)]), disable_tqdm=True)
  whole = [1] + lm.tok.sp.encode(context + continuation)
  n_cont = len(whole) - 1 - len(lm.tok.sp.encode(context))
  assert len(whole) > 2 * 17 and n_cont > 1
  logps, argmax = _torch_logprobs(torch_model, whole[-17:])
  np.testing.assert_allclose(ll, logps[-n_cont:].sum(), rtol=1e-4)
  assert greedy == all(argmax[t - 1] == whole[-17:][t] for t in range(17 - n_cont, 17))
  # A continuation longer than max_length alone cannot be scored: an error, not a silent cut.
  with pytest.raises(ValueError, match="do not fit in a context of 16"):
    short.loglikelihood(_instances("loglikelihood", [("the", " cat" * 20)]), disable_tqdm=True)


def test_command_line_bad_path_is_one_line(tmp_path, capsys, monkeypatch):
  # lm-eval's command line builds the model from --model_args after indexing every task it knows
  # (about 10 s here): stood in for by that construction alone, which is what fails.
  import lm_eval.__main__
  monkeypatch.setattr(lm_utils, "_LOGGING_CONFIGURED", True)  # no lm-eval handler on pytest's stderr
  nope = str(tmp_path / "nope")
  monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: lm_eval_harness.LlamaJaxLM(path=nope))
  with pytest.raises(SystemExit) as exit:
    lm_eval_harness.main()
  err = capsys.readouterr().err
  assert exit.value.code == 1 and "Traceback" not in err
  assert err.strip().splitlines()[-1] == f"error: checkpoint path does not exist: {nope}"
