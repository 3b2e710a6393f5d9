"""Every mistake of issue 20's list is one line that names it, with its exit code, and leaves the
workdir's files byte-identical; and the quiet behaviours a user should see (help, notes, progress)."""

import io
import json
import os
import subprocess
import sys
import tomllib

import pytest
from test_train import corpus, run_train, write_config  # noqa: F401 (corpus: a fixture)
from test_workdir import one_line, saved, snapshot  # noqa: F401 (saved: a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL_KEYS = ("batch_size, checkpoint_every, data, eval_every, init_from, keep_checkpoints, log_every, lora, "
                  "mesh, model, num_steps, optimizer, peak_flops_per_device, recipe, seed, seq_len")

# (name, train.py flags after --config=CFG --workdir=RUN (CFG: the test config; `{...}` filled in),
#  the workdir before (existing: a directory with files; absent; file), the line, the exit code)
CASES = [
    ("config file that does not exist", ["--config=configs/nope.py"], "existing",
     "error: --config configs/nope.py: no such file ({repo}/configs/nope.py)", 2),
    ("unknown key without a close one", ["--config.trainer.bogus=1"], "existing",
     "error: --config.trainer.bogus: the config has no key 'trainer'; its keys: " + TOP_LEVEL_KEYS, 2),
    ("unknown key with a close one", ["--config.optimiser.lr=1e-3"], "existing",
     "error: --config.optimiser.lr: the config has no key 'optimiser'; did you mean optimizer?", 2),
    ("typo in a nested key", ["--config.data.sources.alpha.weigth=2"], "existing",
     "error: --config.data.sources.alpha.weigth: data.sources.alpha has no key 'weigth'; did you mean "
     "weight?", 2),
    ("value of the wrong type", ["--config.num_steps=abc"], "existing",
     "error: flag --config.num_steps=abc: invalid literal for int() with base 10: 'abc'", 2),
    ("mesh rules that are not pairs", ["--config.mesh.rules=2"], "existing",
     "error: mesh.rules must be (logical axis, mesh axes) pairs, as sharding.DEFAULT_RULES is; got (2,)", 1),
    ("workdir that is a file", [], "file", "error: --workdir {run} is a file, not a directory", 1),
    pytest.param(  # found at the first batch, after the model is initialised: seconds
        "all sources empty, tokenizer given",
        ["--config.data.sources.alpha.path={empty}", "--config.data.sources.beta.path={empty}"], "absent",
        "error: no documents in any source of this split (for this process): alpha, beta", 1,
        marks=pytest.mark.slow),
    ("all sources empty, tokenizer to train",
     ["--config.data.sources.alpha.path={empty}", "--config.data.sources.beta.path={empty}",
      "--config.data.tokenizer=", "--config.data.cache_dir={tmp}/cache"], "absent",
     "error: data.sources hold no text to train a tokenizer on (alpha, beta are empty)", 1),
    ("log_every 0", ["--config.log_every=0"], "absent", "error: log_every must be >= 1, got 0", 1),
    ("evaluation of no batches", ["--config.eval_every=2", "--config.data.eval_batches=0"], "absent",
     "error: data.eval_batches must be >= 1 with evaluation on (eval_every 2), got 0", 1),
    ("a chunk size of nothing", ["--config.data.chunk_chars=0"], "absent",
     "error: data.chunk_chars must be >= 1 (characters read per tokenizer call), got 0", 1),
    pytest.param(  # found before the first step: seconds (it was found after eval_every steps)
        "evaluation without validation data", ["--config.eval_every=2", "--config.data.holdout_every=0"],
        "absent", "error: no validation data: set data.eval_sources or data.holdout_every > 0", 1,
        marks=pytest.mark.slow),
    ("init_from that does not exist", ["--config.init_from={tmp}/nope", "--config.data.tokenizer="], "absent",
     "error: init_from {tmp}/nope: no such file or directory", 1),
]
from conftest import xla_flags


@pytest.mark.slow
@pytest.mark.parametrize("name, flags, before, expected, code", CASES,
                         ids=[(c.values if hasattr(c, "values") else c)[0] for c in CASES])
def test_train_mistake_is_one_line_and_leaves_the_workdir_as_it_was(corpus, tmp_path, name, flags,  # noqa: F811
                                                                    before, expected, code):
  config = write_config(tmp_path / "cfg.py", corpus)
  run = tmp_path / "run"
  if before == "existing":
    run.mkdir()
    (run / "model_config.json").write_text('{"dim": 64}')
    (run / "metrics.jsonl").write_text('{"step": 2, "train/loss": 5.5}\n')
  elif before == "file":
    run.write_text("not a directory")
  (tmp_path / "empty.jsonl").write_text("")
  fill = dict(repo=REPO, run=run, tmp=tmp_path, empty=tmp_path / "empty.jsonl")
  expected_before = snapshot(run)
  result, out, err = run_train(config, run, *[f.format(**fill) for f in flags])
  assert result == code, err[-3000:]
  assert one_line(err) == expected.format(**fill)
  assert snapshot(run) == expected_before


@pytest.mark.slow
def test_non_finite_loss_before_the_first_checkpoint_says_there_is_nothing_to_resume(corpus, tmp_path):  # noqa: F811
  config = write_config(tmp_path / "cfg.py", corpus)
  code, _, err = run_train(config, tmp_path / "run", "--config.optimizer.z_loss=1e300")
  assert code == 1
  assert err.strip().splitlines()[-1] == (
      "error: non-finite loss or gradient at or before step 2, before the first checkpoint: nothing to "
      "resume from. Lower optimizer.lr or check the data.")
  assert "Traceback" not in err
  # The one mistake of the list that gets as far as training: the run leaves its record (metrics, to
  # see the loss diverge) and no checkpoint, so the same command with a fix starts afresh.
  assert os.listdir(tmp_path / "run" / "checkpoints") == []


def test_bench_outside_the_repository_names_the_config_path_it_tried(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "llama_jax.bench", "train", "--steps=1"], cwd=tmp_path, env=env,
                     capture_output=True, text=True)
  assert r.returncode == 2
  assert one_line(r.stderr) == (f"error: --config configs/tinyllama_1b.py: no such file "
                                f"({tmp_path}/configs/tinyllama_1b.py)")
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_bench_reads_a_config_file_given_by_its_path_from_anywhere(tmp_path):
  # configs/tiny.py imports `configs.default`: its package's parent goes on the path
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(1))
  r = subprocess.run([sys.executable, "-m", "llama_jax.bench", "train", f"--config={REPO}/configs/tiny.py",
                      "--config.model.n_layers=1", "--config.model.dim=32", "--config.model.n_heads=2",
                      "--config.model.n_kv_heads=2", "--config.model.vocab_size=64", "--config.batch_size=2",
                      "--config.seq_len=8", "--warmup=1", "--steps=1"],
                     cwd=tmp_path, env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout.splitlines()[-1])["seq_len"] == 8


def test_lm_eval_command_without_lm_eval_says_which_extra_to_install():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    script = tomllib.load(f)["project"]["scripts"]["llama-jax-lm-eval"]
  module, function = script.split(":")
  # lm-eval is installed here: hide it, as a `pip install -e .` without the extra leaves it out
  code = (f"import sys\nsys.modules['lm_eval'] = None\nfrom {module} import {function}\n{function}()")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 1
  assert one_line(r.stderr) == ("error: llama-jax-lm-eval needs lm-eval, an optional dependency: "
                                "pip install 'llama_jax[lm_eval]'")


# --- the quiet behaviours


def _default_config_comments():
  """{top-level field: its comment} as configs/default.py writes them."""
  comments = {}
  for line in open(os.path.join(REPO, "configs", "default.py")):
    line = line.strip()
    if line.startswith("config.") and "#" in line:
      name = line[len("config."):].split("=")[0].strip()
      if "." not in name:
        comments[name] = line.split("#", 1)[1].strip()
  return comments


@pytest.mark.slow
def test_train_help_lists_the_config_fields_with_their_comments_and_exits_0():
  r = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  comments = _default_config_comments()
  assert "num_steps" in comments and "data" in comments
  for name, comment in comments.items():
    assert any(line.split()[:1] == [name] and line.rstrip().endswith(comment) for line in lines), name
  assert "--config.optimizer.lr=1e-3" in r.stdout


def test_generate_help_shows_the_defaults(capsys):
  from llama_jax.generate.cli import parse_args
  with pytest.raises(SystemExit) as e:
    parse_args(["--help"])
  assert e.value.code == 0
  out = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
  # Sampling flags default to the checkpoint's generation_config.json, then to these values.
  for flag, default in (("--max_new_tokens", "else 256"), ("--temperature", "else 0.6"), ("--top_p", "else 0.9"),
                        ("--top_k", "else 0"), ("--batch_size", "(default: 16)"), ("--seed", "(default: 0)")):
    assert f"{flag} " in out and default in out.split(f"{flag} ", 1)[1].split(" --")[0], flag


@pytest.mark.slow
def test_max_new_tokens_beyond_the_context_is_said_once(saved, capsys):  # noqa: F811
  import llama_jax
  from llama_jax.generate.cli import main
  tokenizer = llama_jax.load(saved).tokenizer
  prompts = ["the cat", "the big red dog ran to the house"]
  longest = max(len(tokenizer.encode(p)) for p in prompts)
  out = io.StringIO()
  argv = ["--checkpoint", str(saved), "--temperature", "0", "--max_new_tokens", "100"]
  assert main(argv + [a for p in prompts for a in ("--prompt", p)], stdout=out) == 0
  assert capsys.readouterr().err == (
      f"note: --max_new_tokens 100 goes past the model's context of 64 tokens: a prompt of {longest} "
      f"tokens gets at most {64 - longest + 1} new ones\n")
  assert main(argv[:-1] + ["4", "--prompt", "the cat"], stdout=out) == 0
  assert capsys.readouterr().err == ""


def test_eta_leaves_out_the_compiling_first_step():
  from llama_jax.train.loop import progress_bar, restart_clock

  class Clock:
    t = 0.0

    def __call__(self):
      return self.t

  clock = Clock()
  bar = progress_bar(total=100, initial=0, enabled=True, file=io.StringIO())
  bar._time = clock  # tqdm's clock, read at each update
  bar.reset(total=100)
  clock.t += 60.0  # the first step: compilation
  restart_clock(bar, 1)
  for _ in range(10):
    clock.t += 1.0
    bar.update(1)
  info = bar.format_dict
  remaining = (info["total"] - info["n"]) / info["rate"]
  assert info["n"] == 11 and 85 <= remaining <= 93, remaining  # 89 steps of 1 s left
  bar.close()


SAVING = ("interrupted (SIGINT): saving a checkpoint after this step, then exiting; interrupt again to exit "
          "at once without saving")


def test_ctrl_c_says_at_once_that_a_checkpoint_is_being_saved(capfd):
  import signal

  from llama_jax.train.loop import _StopSignal
  with _StopSignal() as stop:
    signal.raise_signal(signal.SIGINT)  # the handler runs here, mid-step for a real run
    assert capfd.readouterr().err == f"\n{SAVING}\n"  # before the loop looks at the flag
    assert stop.requested(step=5, sync_every=10)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(corpus, tmp_path):  # noqa: F811
  # On a checkpoint_every step: the step's checkpoint is the one kept, not saved twice (an error).
  config = write_config(tmp_path / "cfg.py", corpus, num_steps=6, log_every=4, checkpoint_every=3)
  code, out, err = run_train(config, tmp_path / "run", env={"LLAMA_JAX_PREEMPT_AT_STEP": "3",
                                                            "LLAMA_JAX_PREEMPT_SIGNAL": "SIGINT"})
  assert code == 130, err[-3000:]
  assert [line.split("\r")[-1] for line in err.splitlines()].count(SAVING) == 1, err[-3000:]
  assert f"stopped by signal 2 at step 3; checkpoint saved in {tmp_path / 'run'}" in out
  assert "Unable to initialize backend" not in err  # absl's INFO line about TPUs, on every run
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["3"]
