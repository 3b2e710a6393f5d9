"""A run never loses or damages its workdir (issue 20): a refused re-run writes nothing, one run at a
time holds a workdir, a damaged checkpoint is named in one line and resume falls back past it, and
after a crash metrics.jsonl and TensorBoard name each step once."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import train_word_tokenizer
from test_train import corpus, read_metrics, run_train, write_config  # noqa: F401 (corpus: a fixture)

import llama_jax
from llama_jax import checkpoint
from llama_jax import model as M
from llama_jax.config import ModelConfig
from llama_jax.tokenizer import Tokenizer
from llama_jax.train import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(path):
  """Every file under `path` (relative name -> bytes); None where nothing exists."""
  path = str(path)
  if not os.path.exists(path):
    return None
  if os.path.isfile(path):
    with open(path, "rb") as f:
      return {"": f.read()}
  files = {}
  for directory, _, names in os.walk(path):
    for name in names:
      full = os.path.join(directory, name)
      with open(full, "rb") as f:
        files[os.path.relpath(full, path)] = f.read()
  return files


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):  # noqa: F811
  """(config path, workdir, stderr) of a finished 6-step run with checkpoints at steps 2, 4 and 6."""
  root = tmp_path_factory.mktemp("trained")
  config = write_config(root / "cfg.py", corpus, num_steps=6, log_every=1, checkpoint_every=2,
                        keep_checkpoints=5)
  code, _, err = run_train(config, root / "run")
  assert code == 0, err[-3000:]
  return config, root / "run", err


def copy_of(trained, tmp_path):
  shutil.copytree(trained[1], tmp_path / "run")
  return tmp_path / "run"


def _array_files(step_dir):
  """The parameters' array data files of one checkpoint step, largest first."""
  files = glob.glob(os.path.join(step_dir, "params", "ocdbt.process_*", "d", "*"))
  return sorted(files, key=os.path.getsize, reverse=True)


def damage(params_dir_parent, kind):
  """Damages the parameters of a saved model or of one checkpoint step, as a disk or a user might."""
  params = os.path.join(params_dir_parent, "params")
  if kind == "truncated":
    path = _array_files(params_dir_parent)[0]
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif kind == "overwritten":  # by another file (the arrays of a saved model are not compressed, so
    # zeros over their bytes would be read as zeros: nothing in the format can tell)
    with open(_array_files(params_dir_parent)[0], "wb") as f:
      f.write(b"some other file\n")
  elif kind == "empty_metadata":
    open(os.path.join(params, "_METADATA"), "w").close()
  elif kind == "empty_manifest":
    open(os.path.join(params, "manifest.ocdbt"), "w").close()
  else:
    raise ValueError(kind)


def one_line(err):
  """The single line a failed command printed (asserting it printed nothing else)."""
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  return lines[0]


# --- 1. a refused re-run writes nothing


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--config.model.n_layers=3", "--config.model.dim=128"],
     "{run} holds checkpoints of another model: model.dim is 64 there, 128 here; model.n_layers is 2 "
     "there, 3 here. Use another --workdir for a new model"),
    # The seed orders each epoch's files: the saved data position means nothing in another order.
    (["--config.num_steps=8", "--config.seed=1"],
     "the run in {run} was started with seed 0; resuming it with seed 1 would skip or repeat data "
     "(--config.seed=0)"),
], ids=["another model", "another seed"])
def test_a_refused_rerun_writes_nothing(trained, tmp_path, flags, message):
  config, _, _ = trained
  run = copy_of(trained, tmp_path)
  before = snapshot(run)
  code, _, err = run_train(config, run, *flags)
  assert code == 1
  assert one_line(err) == "error: " + message.format(run=run)
  assert snapshot(run) == before
  assert np.isfinite(llama_jax.load(run).logits([[1, 5, 9]])).all()  # still loads (the issue: it did not)


@pytest.mark.slow
def test_running_a_finished_run_again_rewrites_nothing(trained, tmp_path):
  config, _, _ = trained
  run = copy_of(trained, tmp_path)
  before = snapshot(run)
  code, _, err = run_train(config, run)
  assert code == 0, err[-3000:]
  assert snapshot(run) == before
  assert "Unable to initialize backend" not in trained[2] + err  # absl's INFO line about TPUs


def test_stored_model_config_check_names_each_differing_field(tmp_path):
  stored = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=320, multiple_of=16, max_seq_len=64)
  checkpoint.write_model_config(str(tmp_path), stored)
  os.makedirs(tmp_path / "checkpoints" / "4")
  # run-time options (compute dtype, attention kernel, remat, scan, loss chunks) may change on resume
  workdir_lib.check_same_model(str(tmp_path), stored.replace(dtype="bfloat16", remat_policy="full",
                                                               loss_chunk_len=16, scan_layers=False))
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.check_same_model(str(tmp_path), stored.replace(n_kv_heads=2, rope_theta=5e5))
  assert str(e.value) == (f"{tmp_path} holds checkpoints of another model: model.n_kv_heads is 4 there, "
                          "2 here; model.rope_theta is 10000.0 there, 500000.0 here. Use another "
                          "--workdir for a new model")


# --- 2. one run at a time


def test_lock_is_exclusive_names_its_holder_and_leaves_no_file(tmp_path):
  path = str(tmp_path / "run")
  with workdir_lib.hold(path):
    holder = json.loads((tmp_path / "run" / workdir_lib.LOCK).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(workdir_lib.WorkdirBusy) as e:
      with workdir_lib.hold(path):
        pass
    assert str(e.value) == (f"{path} is in use by another run (pid {os.getpid()} on {socket.gethostname()}, "
                            f"started {holder['started']}); wait for it to end or use another --workdir")
  assert not os.path.exists(path)  # it made the directory, and nothing was written into it
  os.makedirs(path)
  (tmp_path / "run" / "kept").write_text("x")
  with workdir_lib.hold(path):
    pass
  assert sorted(os.listdir(path)) == ["kept"]


def test_lock_of_a_killed_holder_is_free(tmp_path):
  path = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys\nfrom llama_jax.train import workdir\n"
       f"with workdir.hold({path!r}):\n  print('held', flush=True)\n  sys.stdin.read()"],
      cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(workdir_lib.WorkdirBusy, match=f"pid {holder.pid} "):
    with workdir_lib.hold(path):
      pass
  holder.kill()  # SIGKILL: no finally, no atexit; the kernel drops the flock with the process
  holder.wait()
  assert os.path.exists(os.path.join(path, workdir_lib.LOCK))  # stale, but not locked
  with workdir_lib.hold(path):
    assert json.loads(open(os.path.join(path, workdir_lib.LOCK)).read())["pid"] == os.getpid()
  assert not os.path.exists(os.path.join(path, workdir_lib.LOCK))


@pytest.mark.slow
def test_second_run_is_refused_while_the_workdir_is_held(trained, tmp_path):
  config, _, _ = trained
  run = copy_of(trained, tmp_path)
  before = snapshot(run)
  with workdir_lib.hold(str(run)):  # the first run, as far as the lock can tell
    started = json.loads((run / workdir_lib.LOCK).read_text())["started"]
    code, _, err = run_train(config, run, "--config.num_steps=8")
  assert code == 1
  assert one_line(err) == (f"error: {run} is in use by another run (pid {os.getpid()} on "
                           f"{socket.gethostname()}, started {started}); wait for it to end or use "
                           "another --workdir")
  assert snapshot(run) == before


# --- 3. damaged checkpoints


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp("saved")
  cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16,
                    max_seq_len=64)
  tok = train_word_tokenizer(root, cfg.vocab_size)
  llama_jax.Model(cfg, nn.unbox(M.init_params(cfg, jax.random.key(0))), Tokenizer(tok)).save(str(root / "model"))
  return root / "model"


@pytest.mark.parametrize("kind", ["truncated", "overwritten", "empty_metadata", "empty_manifest"])
def test_damaged_checkpoint_is_one_line_naming_it_in_every_tool(saved, tmp_path, kind, capsys):
  from llama_jax.convert import cli as convert
  from llama_jax.evaluate.__main__ import main as evaluate
  from llama_jax.generate.cli import main as generate
  model = tmp_path / "model"
  shutil.copytree(saved, model)
  damage(model, kind)
  params = str(model / "params")

  with pytest.raises(checkpoint.CheckpointError) as e:
    llama_jax.load(model)
  message = str(e.value)
  assert message.startswith(f"checkpoint {params} cannot be read: ") and "\n" not in message, message
  if kind == "empty_metadata":
    assert message.startswith(f"checkpoint {params} cannot be read: _METADATA: ")
  if kind == "empty_manifest":
    assert message.startswith(f"checkpoint {params} cannot be read: manifest.ocdbt: ")
  if kind in ("truncated", "overwritten"):
    assert ": parameter " in message

  # Which parameter of a damaged data file fails first varies (the reads are concurrent): compare
  # up to it.
  head = message.split(": parameter ")[0] + ": parameter " if kind in ("truncated", "overwritten") else message

  def said(err, prefix):
    assert err.count("\n") == 1 and err.startswith(prefix + head), err

  capsys.readouterr()
  assert generate(["--checkpoint", str(model), "--prompt", "the cat"]) == 1
  said(capsys.readouterr().err, "error: ")
  assert convert.main(["--input", str(model), "--output", str(tmp_path / "out"), "--to", "hf"]) == 1
  said(capsys.readouterr().err, "convert: error: ")
  (tmp_path / "text.txt").write_text("the cat sat on the mat " * 20)
  assert evaluate(["perplexity", "--model", str(model), "--data", str(tmp_path / "text.txt"), "--no_progress"]) == 1
  said(capsys.readouterr().err, f"error: {model}: ")


@pytest.mark.slow
def test_resume_falls_back_past_a_damaged_checkpoint_and_keeps_it(trained, tmp_path):
  config, original, _ = trained
  run = copy_of(trained, tmp_path)
  damage(run / "checkpoints" / "6", "truncated")
  damaged = snapshot(run / "checkpoints" / "6")

  # generate.py on the workdir (its newest step): one line naming the file and the older steps
  r = subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), "--checkpoint", str(run),
                      "--prompt", "the"], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 1
  line = one_line(r.stderr)
  assert line.startswith(f"error: checkpoint {run}/checkpoints/6/params cannot be read: parameter "), line
  assert line.endswith(f" (the workdir's other checkpoints: steps 2, 4; pass {run}/checkpoints/4 to use one)")

  code, _, err = run_train(config, run, "--config.num_steps=8")
  assert code == 0, err[-3000:]
  warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
  assert len(warnings) == 1 and warnings[0].startswith(
      f"warning: checkpoint {run}/checkpoints/6/params cannot be read: parameter "), err[-3000:]
  assert f"resumed from step 4; the unreadable step 6 is kept in {run}/damaged_checkpoints/6" in err
  assert snapshot(run / "damaged_checkpoints" / "6") == damaged  # moved aside, never deleted
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "6", "8"]
  rows = read_metrics(run)
  assert [r["step"] for r in rows] == list(range(1, 9))  # the rows after step 4 were replaced
  # an exact resume from step 4: steps 5 and 6 again, as the original run took them
  first = {r["step"]: r["train/loss"] for r in read_metrics(original)}
  np.testing.assert_allclose([rows[4]["train/loss"], rows[5]["train/loss"]], [first[5], first[6]], rtol=1e-6)


@pytest.mark.slow
def test_no_readable_checkpoint_stops_and_changes_nothing(trained, tmp_path):
  config, _, _ = trained
  run = copy_of(trained, tmp_path)
  for step, kind in (("6", "empty_manifest"), ("4", "overwritten"), ("2", "empty_metadata")):
    damage(run / "checkpoints" / step, kind)
  before = snapshot(run)
  code, _, err = run_train(config, run, "--config.num_steps=8")
  assert code == 1
  lines = err.strip().splitlines()
  assert len(lines) == 4, err
  for line, step in zip(lines, (6, 4, 2)):
    assert line.startswith(f"warning: checkpoint {run}/checkpoints/{step}/params cannot be read: "), line
  assert lines[-1] == (f"error: no checkpoint in {run}/checkpoints can be read (steps 6, 4, 2); "
                       "nothing was moved or deleted")
  assert snapshot(run) == before


# --- 4. metrics after a crash


def _tensorboard_steps(workdir, tag="train/loss"):
  """The steps TensorBoard shows for `tag` (its own reader: purges of resumed runs applied)."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(workdir))
  acc.Reload()
  return [e.step for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_kill_9_then_resume_names_each_step_once(corpus, tmp_path):  # noqa: F811
  config = write_config(tmp_path / "cfg.py", corpus, num_steps=8, log_every=1, checkpoint_every=3)
  code, _, err = run_train(config, tmp_path / "run", env={"LLAMA_JAX_PREEMPT_AT_STEP": "5",
                                                          "LLAMA_JAX_PREEMPT_SIGNAL": "SIGKILL"})
  assert code == -signal.SIGKILL, err[-3000:]
  assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]
  # the killed run's TensorBoard file holds every logged step (it was flushed at each log line)
  assert _tensorboard_steps(tmp_path / "run") == [1, 2, 3, 4, 5]

  code, _, err = run_train(config, tmp_path / "run")
  assert code == 0, err[-3000:]
  assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 9))
  assert _tensorboard_steps(tmp_path / "run") == list(range(1, 9))


def test_metrics_writer_drops_rows_after_the_resumed_step_and_writes_lazily(tmp_path):
  from llama_jax.train.metrics import MetricsWriter
  rows = [{"step": s, "train/loss": 5.0 - s / 10} for s in range(1, 7)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  writer = MetricsWriter(str(tmp_path), start_step=4)
  writer.close()
  assert read_metrics(tmp_path) == rows[:4]
  assert not glob.glob(str(tmp_path / "events.out.tfevents.*"))  # nothing logged: no new file
  writer = MetricsWriter(str(tmp_path), start_step=4)
  writer.write(5, {"train/loss": 1.5})
  # flushed at once: readable before close, as a killed run leaves it
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
  assert _tensorboard_steps(tmp_path) == [5]
  writer.close()


def _stderr_of(code: str) -> str:
  """What a fresh Python process running `code` prints to stderr (on the CPU)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stderr


def test_after_a_failed_restore_only_closed_loop_callbacks_are_silenced():
  # Reads abandoned by a failed restore may finish after its event loop closed and be printed
  # through sys.excepthook (tensorstore's thread) or threading.excepthook: silenced; anything else
  # still prints.
  code = "\n".join([
      "import sys, threading",
      "from llama_jax import checkpoint",
      "checkpoint._quiet_abandoned_reads()",
      "sys.excepthook(RuntimeError, RuntimeError('Event loop is closed'), None)",
      "def closed(): raise RuntimeError('Event loop is closed')",
      "t = threading.Thread(target=closed); t.start(); t.join()",
      "def other(): raise KeyError('thread error kept')",
      "t = threading.Thread(target=other); t.start(); t.join()",
      "sys.excepthook(ValueError, ValueError('kept'), None)",
  ])
  err = _stderr_of(code)
  assert "Event loop is closed" not in err
  assert "ValueError: kept" in err and "thread error kept" in err


def test_after_a_failed_restore_its_abandoned_array_reads_are_not_reported():
  # Each array of a checkpoint with an empty manifest fails to open alike; Orbax awaits the first
  # failure, and asyncio reports the others as "Task exception was never retrieved" when they are
  # collected: silenced for Orbax's array reads (`async_deserialize`), kept for any other task.
  code = "\n".join([
      "import asyncio, gc, logging",
      "from llama_jax import checkpoint",
      "logging.basicConfig()",
      "checkpoint._quiet_abandoned_reads()",
      "async def async_deserialize(): raise ValueError('DATA_LOSS: Error decoding manifest')",
      "async def other(): raise KeyError('task error kept')",
      "async def main():",
      "  for coroutine in (async_deserialize, other):",
      "    asyncio.get_running_loop().create_task(coroutine())",
      "  await asyncio.sleep(0.01)",
      "asyncio.run(main())",
      "gc.collect()",
  ])
  err = _stderr_of(code)
  assert "DATA_LOSS" not in err
  assert err.count("never retrieved") == 1 and "task error kept" in err
