"""The alignment recipes through the real entry point: `train.py` trains a reward model, DPO and PPO
(and GRPO) from a tiny model, writes their metrics, and resumes exactly after a SIGTERM (PPO's
rollouts included); the results load through the public API. Plus fast checks of the recipes'
pieces: DPO's loss is log 2 while the policy is its reference, PPO's sequence assembly, and a reward
run's chat template and window (one step in this process)."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import xla_flags

from llama_jax import checkpoint
from llama_jax.align.heads import reward_params
from llama_jax.align.ppo import loss_type as ppo_loss_type
from llama_jax.config import ModelConfig
from llama_jax.model import init_params
from llama_jax.tokenizer import Tokenizer
from llama_jax.tokenizer import train as sp_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "red blue green cat dog sky sea tree big small yes no one two three apple pear".split()
CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16, max_seq_len=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tokenizer, a random 'SFT' model and a random reward model with it, pairs and prompts."""
  root = tmp_path_factory.mktemp("align")
  rng = random.Random(0)
  texts = [" ".join(rng.choices(WORDS, k=8)) for _ in range(500)]
  tok = Tokenizer(sp_train.train(texts, CFG.vocab_size, str(root / "tok"), num_threads=1))
  checkpoint.save_model(str(root / "sft"), CFG, nn.unbox(init_params(CFG, jax.random.key(0))), tok.path)
  params = nn.unbox(reward_params(CFG, jax.random.key(1)))
  params["score"] = jax.random.normal(jax.random.key(2), (CFG.dim,))
  checkpoint.save_model(str(root / "rm"), CFG, params, tok.path)
  with open(root / "pairs.jsonl", "w") as f, open(root / "prompts.jsonl", "w") as g:
    for _ in range(300):
      prompt = " ".join(rng.choices(WORDS, k=3)) + "?"
      chosen, rejected = rng.sample(WORDS, 2)
      f.write(json.dumps({"prompt": prompt, "chosen": chosen + ".", "rejected": rejected + " " + chosen}) + "\n")
      g.write(json.dumps({"prompt": prompt}) + "\n")
  return root


def write_config(path, setup, base, **fields):
  overrides = "\n".join(f"  config.{k} = {v!r}" for k, v in fields.items())
  source = "prompts" if base == "ppo_tiny" else "pairs"
  path.write_text(textwrap.dedent(f"""\
      import ml_collections
      from configs import {base}
      from llama_jax.data.config import source

      def get_config():
        config = {base}.get_config()
        config.init_from = {str(setup / 'sft')!r}
        config.data.sources = ml_collections.ConfigDict(dict(
            {source}=source({str(setup / (source + '.jsonl'))!r}, 1.0, template="raw")))
        config.data.holdout_every = 10
        config.data.eval_batches = 2
        config.data.prefetch = 1
        config.data.num_threads = 1
        for k, v in {CFG.to_dict()!r}.items():
          config.model[k] = v
        config.batch_size = 4
        config.seq_len = 16
        config.num_steps = 6
        config.log_every = 1
        config.eval_every = 3
        config.checkpoint_every = 0
        config.optimizer.warmup_steps = 0
        config.optimizer.warmup_ratio = 0.0
      """) + overrides + "\n  return config\n")
  return str(path)


def run_train(config, workdir, *flags, env=None):
  environment = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1),
                     JAX_DEFAULT_MATMUL_PRECISION="highest", **(env or {}))
  proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--config={config}",
                         f"--workdir={workdir}", *flags], cwd=REPO, env=environment, capture_output=True,
                        text=True, timeout=600)
  return proc.returncode, proc.stderr


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def straight_and_preempted(tmp_path, config, keys, flags=()):
  """The run straight through, and the same run stopped by SIGTERM after step 3 and restarted:
  the last metrics are the same."""
  code, err = run_train(config, tmp_path / "straight", *flags)
  assert code == 0, err[-3000:]
  code, err = run_train(config, tmp_path / "preempted", *flags, env={"LLAMA_JAX_PREEMPT_AT_STEP": "3"})
  assert code == 128 + signal.SIGTERM, err[-3000:]
  assert os.listdir(tmp_path / "preempted" / "checkpoints") == ["3"]
  code, err = run_train(config, tmp_path / "preempted", *flags)
  assert code == 0, err[-3000:]
  straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "preempted")
  assert [r["step"] for r in straight] == list(range(1, 7))
  for key in keys:
    np.testing.assert_allclose(resumed[-1][key], straight[-1][key], rtol=1e-5, atol=1e-6, err_msg=key)
  return straight


@pytest.mark.slow
def test_reward_model_trains_resumes_and_loads(setup, tmp_path):
  config = write_config(tmp_path / "cfg.py", setup, "reward_tiny", **{"optimizer.lr": 3e-3})
  rows = straight_and_preempted(tmp_path, config, ["rm/loss", "rm/accuracy", "rm/margin", "eval/loss"])
  for key in ("rm/loss", "rm/accuracy", "rm/margin", "train/grad_norm", "train/lr", "perf/tokens_per_s"):
    assert key in rows[-1], key  # (the first step is compilation: no perf/ numbers)
  assert {"eval/loss", "eval/accuracy", "eval/margin"} <= set(rows[2]) and "eval/loss" not in rows[0]
  assert rows[0]["rm/loss"] == pytest.approx(math.log(2), abs=1e-6)  # the head starts at zero
  assert rows[-1]["rm/loss"] < rows[0]["rm/loss"]
  from llama_jax.align import load_reward_model
  rm = load_reward_model(tmp_path / "straight")
  assert np.isfinite(rm.score(["red cat", "blue dog"])).all()


@pytest.mark.slow
def test_dpo_trains_and_resumes_exactly(setup, tmp_path):
  config = write_config(tmp_path / "cfg.py", setup, "dpo_tiny", **{"optimizer.lr": 3e-3})
  keys = ["dpo/loss", "dpo/accuracy", "dpo/margin", "dpo/rewards_chosen", "dpo/rewards_rejected"]
  rows = straight_and_preempted(tmp_path, config, keys + ["eval/loss"])
  # The first step's loss is taken before its update: the policy is still the reference.
  assert rows[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert rows[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-6)
  assert rows[-1]["dpo/loss"] < rows[0]["dpo/loss"] and rows[-1]["dpo/margin"] > 0
  assert {"eval/" + k.split("/")[1] for k in keys} <= set(rows[2])
  import llama_jax
  assert llama_jax.load(tmp_path / "straight").config == CFG


@pytest.mark.slow
def test_ppo_trains_resumes_exactly_and_loads_as_a_model(setup, tmp_path):
  config = write_config(tmp_path / "cfg.py", setup, "ppo_tiny", **{
      "ppo.reward_model": str(setup / "rm"), "ppo.prompt_len": 12, "ppo.max_new_tokens": 6,
      "optimizer.lr": 1e-3})
  keys = ["ppo/reward_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/clipfrac"]
  rows = straight_and_preempted(tmp_path, config, keys + ["eval/reward_mean"])
  assert rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is the reference's
  assert {"eval/reward_mean", "eval/kl"} <= set(rows[2])
  import llama_jax  # the policy's tree holds a value head beside the model: it loads as the model
  model = llama_jax.load(tmp_path / "straight")
  assert len(model.generate(["red cat?"], max_new_tokens=3)) == 1
  # GRPO, sampling at a temperature (the log-probs are taken at it: the first update's policy is
  # still the reference, so its KL is 0) and averaging per answer (ppo.loss_type "auto").
  code, err = run_train(config, tmp_path / "grpo", "--config.ppo.advantage=grpo", "--config.ppo.group_size=2",
                        "--config.ppo.temperature=0.7", "--config.num_steps=2", "--config.eval_every=0")
  assert code == 0, err[-3000:]
  grpo = metrics(tmp_path / "grpo")
  assert "ppo/k3_kl" in grpo[-1] and "ppo/value_loss" not in grpo[-1]
  assert grpo[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_a_reward_run_scores_with_the_chat_template_it_trained_with(setup, tmp_path):
  """A reward run whose pairs were rendered with a named template (here llama-2) scores "auto" in
  that template, not in the tokenizer's default (vicuna_v1.1): another rendering, other scores."""
  from llama_jax.align import get_recipe, load_reward_model
  from llama_jax.train.cli import load_config
  from llama_jax.train.loop import train_and_evaluate
  config = load_config(write_config(tmp_path / "cfg.py", setup, "reward_tiny", **{
      "data.sources.pairs.template": "llama-2", "num_steps": 1, "eval_every": 0,
      "batch_size": 8, "seq_len": 48, "optimizer.lr": 3e-3}))  # 8 rows: one a device of this process
  train_and_evaluate(config, str(tmp_path / "rm"), get_recipe(config))
  rm = load_reward_model(tmp_path / "rm")
  # A short system prompt: vicuna's default one would not fit the tiny model's window.
  conversations = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "red cat?"},
                    {"role": "assistant", "content": answer}] for answer in ("blue dog.", "sky")]
  trained = rm.score(conversations, template="llama-2")
  np.testing.assert_array_equal(rm.score(conversations), trained)
  assert not np.allclose(rm.score(conversations, template="vicuna_v1.1"), trained)
  assert rm.template == "llama-2"


def test_reward_template_is_recorded_only_when_the_sources_agree():
  from llama_jax.align.reward import trained_template
  run = {"recipe": "reward", "data": {"sources": {
      "a": {"path": "a.jsonl", "weight": 1.0, "template": "chatml"},
      "b": {"path": "b.jsonl", "weight": 2.0, "template": "chatml"},
      "off": {"path": "c.jsonl", "weight": 0.0, "template": "raw"}}}}  # weight 0: never read
  assert trained_template(run) == "chatml"
  run["data"]["sources"]["b"]["template"] = "llama-2"
  assert trained_template(run) is None
  assert trained_template({"recipe": "lm", "data": {"sources": {"a": {"template": "chatml"}}}}) is None


def test_a_reward_model_seeing_more_positions_than_its_context_is_refused(setup, tmp_path):
  """A reward model reads its score off all seq_len + 1 tokens of a row: seq_len = max_seq_len
  would put the last token past the context (and `score_tokens` refuses such lengths). Refused
  before anything compiles or is written."""
  from llama_jax import sharding
  from llama_jax.align import get_recipe
  from llama_jax.train.cli import load_config
  from llama_jax.train.loop import train_and_evaluate
  config = load_config(write_config(tmp_path / "cfg.py", setup, "reward_tiny", **{
      "seq_len": CFG.max_seq_len, "batch_size": 8}))  # 8 rows: one a device of this process
  with pytest.raises(sharding.ConfigError, match=rf"seq_len {CFG.max_seq_len}.*max_seq_len {CFG.max_seq_len}"
                     rf".*seq_len <= {CFG.max_seq_len - 1}"):
    train_and_evaluate(config, str(tmp_path / "rm"), get_recipe(config))
  assert not os.path.exists(tmp_path / "rm") or not os.listdir(tmp_path / "rm")


def test_unknown_recipe_and_missing_models_are_config_errors():
  from configs import ppo_tiny
  from llama_jax import sharding
  from llama_jax.align import get_recipe
  from llama_jax.align.ppo import validate
  config = ppo_tiny.get_config()
  config.recipe = "rlhf"
  with pytest.raises(sharding.ConfigError, match="unknown config.recipe 'rlhf'"):
    get_recipe(config)
  mesh = sharding.make_mesh(1, -1, 1)
  config.ppo.reward_model = ""
  with pytest.raises(sharding.ConfigError, match="config.ppo.reward_model is empty"):
    validate(config, CFG, mesh)
  config.ppo.reward_model, config.ppo.minibatches = "rm", 3
  with pytest.raises(sharding.ConfigError, match="ppo.minibatches"):
    validate(config, CFG, mesh)


def test_dpo_objective_is_log_two_at_the_reference_and_adds_the_chosen_nll():
  from ml_collections import ConfigDict
  from llama_jax.align.dpo import DPO
  from llama_jax.model import forward
  params = nn.unbox(init_params(CFG, jax.random.key(0)))
  rng = np.random.default_rng(0)
  batch = {k: jnp.asarray(rng.integers(3, CFG.vocab_size, (3, 9)), jnp.int32) for k in ("chosen", "rejected")}
  for side in ("chosen", "rejected"):
    batch[side + "_mask"] = jnp.asarray(np.arange(9) >= 4, jnp.float32)[None].repeat(3, 0)
  batch["chosen_mask"] = batch["chosen_mask"].at[2].set(0)  # a padding row does not count
  totals = {}
  for coef in (0.0, 0.2):
    config = ConfigDict({"dpo": {"beta": 0.1, "loss": "sigmoid", "nll_coef": coef}})
    objective = jax.jit(lambda p, b, ref, config=config: DPO().objective(config, CFG, p, b, ref))
    totals[coef], count, sums = objective(params, batch, params)
  assert float(count) == 2
  np.testing.assert_allclose(totals[0.0] / count, math.log(2), rtol=1e-6)
  np.testing.assert_allclose(sums["dpo/accuracy"], 0.0)
  # The chosen answers' NLL per token, from the model's logits.
  logits = np.asarray(forward(CFG, params, batch["chosen"]), np.float64)[:, :-1]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  target = np.take_along_axis(logp, np.asarray(batch["chosen"])[:, 1:, None], axis=-1)[..., 0]
  m = np.asarray(batch["chosen_mask"])[:, 1:]
  nll = -(target * m).sum(1)[:2] / m.sum(1)[:2]
  np.testing.assert_allclose(sums["dpo/nll"], nll.sum(), rtol=1e-5)
  np.testing.assert_allclose(totals[0.2], totals[0.0] + 0.2 * nll.sum(), rtol=1e-5)


def test_ppo_assembles_each_response_right_after_its_prompt():
  from llama_jax.align.ppo import assemble
  prompt = jnp.array([[1, 5, 6, 0], [1, 7, 0, 0]])
  response = jnp.array([[8, 9, 2], [4, 4, 4]])
  tokens, index = assemble(prompt, jnp.array([3, 2]), response, jnp.array([3, 1]), pad_id=0)
  np.testing.assert_array_equal(tokens, [[1, 5, 6, 8, 9, 2, 0], [1, 7, 4, 0, 0, 0, 0]])
  # position i of a row holds the token before response token i
  np.testing.assert_array_equal(index, [[2, 3, 4], [1, 2, 3]])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_ppo_log_probs_and_entropies_are_of_the_sampling_temperature(temperature):
  """PPO's log-probs (its ratio and KL) are of softmax(logits / T), the distribution rollouts at
  temperature T draw from (as TRL's PPO divides its logits by T): numpy over the model's logits."""
  from llama_jax.align.heads import policy_params, response_outputs
  from llama_jax.model import Transformer
  params = nn.unbox(jax.jit(policy_params, static_argnums=0)(CFG, jax.random.key(3)))
  tokens = jax.random.randint(jax.random.key(4), (2, 9), 1, CFG.vocab_size)
  index = jnp.array([[3, 4, 5, 6], [5, 6, 7, 7]])
  targets = jnp.take_along_axis(tokens, jnp.minimum(index + 1, 8), axis=1)
  outputs = jax.jit(response_outputs, static_argnums=(0, 5))
  logps, entropy, values = outputs(CFG, params, tokens, index, targets, temperature)

  model = {k: v for k, v in params.items() if k != "value_head"}
  logits = np.asarray(jax.jit(Transformer(CFG).apply)({"params": model}, tokens), np.float64) / temperature
  logits = np.take_along_axis(logits, np.asarray(index)[..., None], axis=1)  # (B, N, V)
  log_softmax = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                       keepdims=True)) - logits.max(-1, keepdims=True)
  expected = np.take_along_axis(log_softmax, np.asarray(targets)[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(logps, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(entropy, -np.sum(np.exp(log_softmax) * log_softmax, -1), rtol=1e-5, atol=1e-5)
  assert values.shape == (2, 4)


@pytest.mark.parametrize("advantage, loss_type", [("grpo", "auto"), ("grpo", "token"), ("gae", "auto")])
def test_ppo_updates_average_each_answer_first_for_grpo(advantage, loss_type):
  """At the rollout's own parameters (ratio 1) the policy loss is -(1/G) Σ_i (1/|o_i|) Σ_t A_i for
  GRPO (Shao et al. 2024, eq. 3), -Σ_i Σ_t A_i / Σ_i |o_i| for PPO's token mean: a group of two
  answers, 1 and 4 tokens long, advantages +1 and -1."""
  import types

  import optax
  from ml_collections import ConfigDict

  from llama_jax.align.heads import policy_params, response_outputs
  from llama_jax.align.ppo import Rollout, assemble
  from llama_jax.train.step import TrainState
  params = nn.unbox(jax.jit(policy_params, static_argnums=0)(CFG, jax.random.key(0)))
  tx = optax.sgd(0.0)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.zeros((), jnp.int32))
  lengths = np.array([1, 4])
  response = jnp.array([[7, 0, 0, 0], [8, 9, 10, 11]])
  tokens, index = assemble(jnp.array([[1, 5], [1, 5]]), jnp.array([2, 2]), response, jnp.asarray(lengths), 0)
  mask = (jnp.arange(4)[None] < jnp.asarray(lengths)[:, None]).astype(jnp.float32)
  logps, _, _ = jax.jit(response_outputs, static_argnums=0)(CFG, params, tokens, index, response)
  advantages = np.array([1.0, -1.0])
  experience = {"tokens": tokens, "index": index, "targets": response, "mask": mask, "old_logps": logps,
                "old_values": jnp.zeros_like(mask), "ref_logps": logps, "returns": jnp.zeros_like(mask),
                "advantages": jnp.asarray(advantages)[:, None] * mask}
  p = ConfigDict(dict(advantage=advantage, loss_type=loss_type, clip=0.2, kl_coef=0.0, vf_coef=0.0,
                      value_clip=0.2, temperature=1.0))
  rollout = types.SimpleNamespace(p=p, cfg=CFG, temperature=1.0, accum=1, run=types.SimpleNamespace(tx=tx),
                                  loss_type=ppo_loss_type(p))
  _, metrics = jax.jit(lambda *a: Rollout._update(rollout, *a))(state, experience, jnp.arange(2))
  per_answer = advantage == "grpo" and loss_type == "auto"
  expected = (-np.mean(advantages) if per_answer else
              -np.sum(advantages * lengths) / lengths.sum())
  np.testing.assert_allclose(float(metrics["ppo/policy_loss"]), expected, rtol=1e-5, atol=1e-6)


def test_ppo_refuses_greedy_rollouts():
  from configs import ppo_tiny
  from llama_jax import sharding
  from llama_jax.align.ppo import validate
  config = ppo_tiny.get_config()
  config.ppo.reward_model, config.ppo.temperature = "rm", 0.0
  with pytest.raises(sharding.ConfigError, match="ppo.temperature must be > 0"):
    validate(config, CFG, sharding.make_mesh(1, -1, 1))


@pytest.fixture(scope="module")
def reward_runs(setup, tmp_path_factory):
  """One step of a reward run whose pairs were rendered with llama-2, training the whole model and
  LoRA adapters (in this process): {"full": workdir, "lora": workdir}."""
  from llama_jax.align import get_recipe
  from llama_jax.train.cli import load_config
  from llama_jax.train.loop import train_and_evaluate
  root = tmp_path_factory.mktemp("reward_runs")
  for name, fields in (("full", {}), ("lora", {"lora.rank": 2})):
    config = load_config(write_config(root / f"{name}.py", setup, "reward_tiny", **{
        "data.sources.pairs.template": "llama-2", "num_steps": 1, "eval_every": 0, "batch_size": 8,
        "seq_len": 48, "optimizer.lr": 3e-3, **fields}))
    train_and_evaluate(config, str(root / name), get_recipe(config))
  return {"full": root / "full", "lora": root / "lora"}


BRIEF = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "red cat?"},
          {"role": "assistant", "content": answer}] for answer in ("blue dog.", "sky")]


@pytest.mark.slow
def test_a_merged_lora_reward_run_keeps_the_chat_template_it_trained_with(reward_runs, tmp_path):
  """save_model writes no run config: the merged reward model carries the run's template record
  (config.json, the fields `trained_template` reads), and stays our checkpoint to every reader."""
  from llama_jax.align import load_reward_model
  from llama_jax.convert import cli as convert
  from llama_jax.convert.source import open_source
  run = reward_runs["lora"]
  assert convert.main(["--input", str(run), "--merge_lora", "--output", str(tmp_path / "merged")]) == 0
  merged = load_reward_model(tmp_path / "merged")
  assert merged.template == load_reward_model(run).template == "llama-2"
  np.testing.assert_allclose(merged.score(BRIEF), load_reward_model(run).score(BRIEF), rtol=1e-5, atol=1e-5)
  assert json.loads((tmp_path / "merged" / checkpoint.RUN_CONFIG).read_text()) == {
      "recipe": "reward", "data": {"sources": {"pairs": {"weight": 1.0, "template": "llama-2"}}}}
  assert open_source(tmp_path / "merged").kind == "orbax"
  # Converted again, the record goes along.
  assert convert.main(["--input", str(tmp_path / "merged"), "--output", str(tmp_path / "again")]) == 0
  assert load_reward_model(tmp_path / "again").template == "llama-2"


@pytest.mark.slow
def test_convert_writes_a_full_reward_run_whole_and_as_a_sequence_classifier(reward_runs, setup, tmp_path,
                                                                          capsys):
  """A reward run's tree has `score` and no `output`: convert restores it as the reward model it is
  (our format, with its template record; --to hf, LlamaForSequenceClassification with the same
  scores), where streaming it as an LM's tensors failed."""
  from llama_jax.align import load_reward_model
  from llama_jax.convert import cli as convert
  run = reward_runs["full"]
  trained = load_reward_model(run)
  assert convert.main(["--input", str(run), "--output", str(tmp_path / "rm")]) == 0
  saved = load_reward_model(tmp_path / "rm")
  assert saved.template == "llama-2"
  np.testing.assert_array_equal(saved.score(BRIEF), trained.score(BRIEF))
  assert convert.main(["--input", str(run), "--to", "hf", "--output", str(tmp_path / "hf")]) == 0
  # python -m llama_jax.align export: over the export, fine; over our saved model, refused in one line.
  from llama_jax.align.__main__ import main as align_main
  with pytest.raises(SystemExit) as exit_:
    align_main(["export", "--input", str(run), "--output", str(tmp_path / "rm")])
  assert exit_.value.code == 1 and "holds a llama_jax model" in capsys.readouterr().err
  assert align_main(["export", "--input", str(run), "--output", str(tmp_path / "hf")]) == 0
  # A Vicuna delta is a language model's: a reward model's missing output head is named in one line.
  capsys.readouterr()
  assert convert.main(["--input", str(run), "--make_delta", "--base", str(setup / "sft"),
                       "--output", str(tmp_path / "delta")]) == 1
  assert "no parameter output" in capsys.readouterr().err
  torch = pytest.importorskip("torch")
  import transformers
  hf = transformers.LlamaForSequenceClassification.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
  tok, pad = trained.tokenizer, hf.config.pad_token_id
  sequences = [tok.encode(text, bos=True, eos=True) for text in ("red cat sky", "blue dog", "no")]
  ids = np.full((len(sequences), max(map(len, sequences))), pad)  # right-padded, as transformers reads it
  for r, s in enumerate(sequences):
    ids[r, :len(s)] = s
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != pad)).logits[:, 0].numpy()
  np.testing.assert_allclose(trained.score_tokens(sequences), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_load_refuses_a_reward_model_and_names_the_reader_that_scores_with_it(reward_runs, setup):
  """A reward model (saved, a run, a LoRA run) has no output head: `llama_jax.load` said nothing and
  handed back Orbax's placeholder for it, which `generate` failed on. It is one error naming
  `load_reward_model`, also where a recipe loads a language model from it (DPO's, PPO's init_from);
  `backbone=True`, a reward run's start, reads the backbone alone."""
  import ml_collections
  import llama_jax
  from llama_jax.align import load_reward_model
  from llama_jax.train.loop import LanguageModel
  for path in (setup / "rm", reward_runs["full"], reward_runs["lora"]):
    with pytest.raises(ValueError, match=r"a reward model .*no language-model head.*llama_jax.load_reward_model"):
      llama_jax.load(path)
  with pytest.raises(ValueError, match="a reward model"):
    LanguageModel().load_pretrained(ml_collections.ConfigDict({"init_from": str(setup / "rm")}), None, None)
  whole = load_reward_model(setup / "rm").params
  backbone = llama_jax.load(setup / "rm", backbone=True).params
  assert sorted(backbone) == ["layers", "norm", "tok_embeddings"]
  jax.tree.map(np.testing.assert_array_equal, backbone, {k: whole[k] for k in backbone})
  assert sorted(llama_jax.load(setup / "sft", backbone=True).params) == ["layers", "norm", "tok_embeddings"]


@pytest.mark.slow
def test_a_reward_run_starts_from_a_reward_models_backbone(setup, tmp_path):
  """init_from a reward model (which `llama_jax.load` refuses whole): the run, full or LoRA, trains
  on its backbone under a fresh head, and the LoRA run loads over it."""
  from llama_jax.align import get_recipe, load_reward_model
  from llama_jax.train.cli import load_config
  from llama_jax.train.loop import train_and_evaluate
  for name, fields in (("full", {}), ("lora", {"lora.rank": 2})):
    config = load_config(write_config(tmp_path / f"{name}.py", setup, "reward_tiny", **{
        "init_from": str(setup / "rm"), "num_steps": 1, "eval_every": 0, "batch_size": 8, "seq_len": 48,
        **fields}))
    train_and_evaluate(config, str(tmp_path / name), get_recipe(config))
    assert metrics(tmp_path / name)[0]["rm/loss"] == pytest.approx(math.log(2), abs=1e-6)  # a fresh head
    assert np.isfinite(load_reward_model(tmp_path / name).score(["red cat", "blue dog"])).all()


def test_convert_swaps_a_reward_models_template_record_in_with_its_weights(setup, tmp_path, monkeypatch):
  """Converting a reward model over another: its template record is part of the save. A crash
  before the swap leaves the old model whole (its weights, its record), one after it the new one
  whole. (The record was written after save_model's swap: a crash in between left the new weights
  under the old model's record, scoring in its template without a word.)"""
  import shutil
  from llama_jax.align import load_reward_model
  from llama_jax.convert import cli as convert

  def reward_model(path, seed, template):
    """A reward model of its own weights, with the record of a run that rendered its pairs in `template`."""
    params = nn.unbox(reward_params(CFG, jax.random.key(seed)))
    params["score"] = jax.random.normal(jax.random.key(seed + 1), (CFG.dim,))
    checkpoint.save_model(str(path), CFG, params, str(setup / "rm" / checkpoint.TOKENIZER))
    (path / checkpoint.RUN_CONFIG).write_text(json.dumps(
        {"recipe": "reward", "data": {"sources": {"pairs": {"weight": 1.0, "template": template}}}}))
    return np.asarray(load_reward_model(path).params["score"])

  old_score = reward_model(tmp_path / "first", 10, "llama-2")
  other = tmp_path / "other"  # another reward model, its record naming another template
  new_score = reward_model(other, 20, "chatml")
  assert not np.array_equal(old_score, new_score)
  out = tmp_path / "out"
  assert convert.main(["--input", str(tmp_path / "first"), "--output", str(out)]) == 0

  class Crash(Exception):
    pass

  def crashing(real, suffix):
    def fn(path, *args, **kwargs):
      if str(args[0] if args else path).endswith(suffix):
        raise Crash(suffix)
      return real(path, *args, **kwargs)
    return fn

  def model_at(path):
    rm = load_reward_model(path)
    return rm.template, np.asarray(rm.params["score"])

  # Before the swap (the old weights set aside): the old model, whole. After it (the old weights
  # deleted): the new model, whole.
  for module, name, want_template, want_score in ((os, "rename", "llama-2", old_score),
                                                  (shutil, "rmtree", "chatml", new_score)):
    monkeypatch.setattr(module, name, crashing(getattr(module, name), "params.previous"))
    with pytest.raises(Crash):
      convert.main(["--input", str(other), "--output", str(out)])
    monkeypatch.undo()
    template, score = model_at(out)
    assert template == want_template
    np.testing.assert_array_equal(score, want_score)
  # A reward model without a record takes the old one's away, in the same save.
  os.remove(other / checkpoint.RUN_CONFIG)
  assert convert.main(["--input", str(other), "--output", str(out)]) == 0
  assert model_at(out)[0] is None and not os.path.exists(out / checkpoint.RUN_CONFIG)
  assert sorted(os.listdir(out)) == sorted(os.listdir(other)), "leftovers of the crashed saves"


def test_ppo_warns_when_its_prompts_render_in_another_template_than_the_reward_model_s(caplog):
  # The reward model scores answers in the layout its pairs had: prompts in another chat template
  # get a warning naming the sources (not an error: scoring across templates can be the point).
  import logging
  from configs import ppo_tiny
  from llama_jax.align.ppo import _warn_of_other_templates
  config = ppo_tiny.get_config()
  config.data.sources.prompts.template = "chatml"
  with caplog.at_level(logging.WARNING, logger="llama_jax"):
    _warn_of_other_templates(config, "rm", "chatml", None)
    assert not caplog.records
    _warn_of_other_templates(config, "rm", None, None)  # unrecorded: nothing to compare
    assert not caplog.records
    _warn_of_other_templates(config, "rm", "vicuna_v1.1", None)
  assert [r.getMessage() for r in caplog.records] == [
      "ppo.reward_model rm was trained on pairs in the chat template 'vicuna_v1.1', but the prompt sources "
      "letters_prompts render in another: it scores answers laid out as it never saw"]  # the demo source's name
