"""End-to-end training: the real entry point, checkpoints, preemption, meshes, several processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
from conftest import xla_flags

from llama_jax.data import DataError
from llama_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly "
         "kings and queens of python code def return class import for in range print").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Two small jsonl sources and a sentencepiece model trained on them."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for name, n in (("alpha", 300), ("beta", 200)):
    with open(root / f"{name}.jsonl", "w") as f:
      for _ in range(n):
        words = rng.choice(WORDS, size=rng.integers(5, 40))
        f.write(json.dumps({"text": " ".join(words)}) + "\n")
  with open(root / "all.txt", "w") as f:
    for name in ("alpha", "beta"):
      for line in open(root / f"{name}.jsonl"):
        f.write(json.loads(line)["text"] + "\n")
  spm.SentencePieceTrainer.train(
      input=str(root / "all.txt"), model_prefix=str(root / "tok"), vocab_size=320, model_type="bpe",
      byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
  return root


def write_config(path, corpus, **fields):
  """A config file that takes configs/tiny.py and points it at the test corpus, with a tiny model."""
  overrides = "\n".join(f"  config.{k} = {v!r}" for k, v in fields.items())
  path.write_text(textwrap.dedent(f"""\
      import ml_collections
      from configs import tiny
      from llama_jax.data.config import source

      def get_config():
        config = tiny.get_config()
        config.data.sources = ml_collections.ConfigDict(dict(
            alpha=source({str(corpus / 'alpha.jsonl')!r}, 0.6),
            beta=source({str(corpus / 'beta.jsonl')!r}, 0.4)))
        config.data.tokenizer = {str(corpus / 'tok.model')!r}
        config.data.holdout_every = 10
        config.data.eval_batches = 2
        config.data.prefetch = 1
        config.model.dim = 64
        config.model.n_layers = 2
        config.model.n_heads = 4
        config.model.n_kv_heads = 2
        config.model.multiple_of = 16
        config.model.vocab_size = 320
        config.model.max_seq_len = 64
        config.seq_len = 32
        config.batch_size = 8
        config.num_steps = 12
        config.log_every = 2
        config.eval_every = 0
        config.checkpoint_every = 0
        config.optimizer.warmup_steps = 4
        config.optimizer.lr = 3e-3
        config.mesh.fsdp = -1
      """) + overrides + "\n  return config\n")
  return str(path)


def run_train(config_path, workdir, *flags, devices=1, env=None, wait=True):
  environment = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                     XLA_FLAGS=xla_flags(devices),
                     JAX_DEFAULT_MATMUL_PRECISION="highest", **(env or {}))
  cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--config={config_path}",
         f"--workdir={workdir}", *flags]
  proc = subprocess.Popen(cmd, cwd=REPO, env=environment, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out, err


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_train_end_to_end_writes_metrics_checkpoint_and_tensorboard(corpus, tmp_path):
  config = write_config(tmp_path / "cfg.py", corpus, eval_every=6, num_steps=12)
  code, out, err = run_train(config, tmp_path / "run")
  assert code == 0, err[-3000:]
  rows = read_metrics(tmp_path / "run")
  assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
  for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s",
              "data/tokens/alpha", "data/tokens/beta"):
    assert key in rows[-1], key
  assert "perf/mfu" not in rows[-1]  # no known peak for a CPU: no number rather than a made-up one
  assert "eval/loss" in rows[2] and "eval/perplexity" in rows[-1]
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]
  assert rows[-1]["data/tokens/alpha"] + rows[-1]["data/tokens/beta"] >= 12 * 8 * 32
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "run"))
  assert os.listdir(tmp_path / "run" / "checkpoints") == ["12"]

  import llama_jax  # the workdir loads as a model: its latest step
  model = llama_jax.load(tmp_path / "run")
  assert model.tokenizer is not None and model.config.dim == 64
  assert np.isfinite(model.logits(np.array([[1, 5, 9]]))).all()


@pytest.mark.slow
def test_sigterm_then_restart_equals_uninterrupted_run(corpus, tmp_path):
  config = write_config(tmp_path / "cfg.py", corpus, num_steps=40, log_every=1)
  code, _, err = run_train(config, tmp_path / "straight")
  assert code == 0, err[-3000:]
  reference = read_metrics(tmp_path / "straight")[-1]

  # A preemption at a known step, through the real SIGTERM handler (no timing involved).
  code, _, err = run_train(config, tmp_path / "preempted", env={"LLAMA_JAX_PREEMPT_AT_STEP": "13"})
  assert code == 128 + signal.SIGTERM, err[-3000:]
  saved = [int(s) for s in os.listdir(tmp_path / "preempted" / "checkpoints")]
  assert saved == [13], saved

  code, _, err = run_train(config, tmp_path / "preempted")
  assert code == 0, err[-3000:]
  resumed = read_metrics(tmp_path / "preempted")
  assert resumed[-1]["step"] == 40
  np.testing.assert_allclose(resumed[-1]["train/loss"], reference["train/loss"], rtol=1e-5)


def test_a_resume_says_when_it_has_nothing_to_train_or_moves_the_schedule_s_end(tmp_path, capsys):
  # Otherwise silent: an exit 0 with nothing done; a cosine bent mid-run. (train_and_evaluate says
  # it on every resume, before anything runs.)
  from ml_collections import ConfigDict
  from llama_jax.train.loop import _say_what_resuming_changes
  (tmp_path / "config.json").write_text(json.dumps({"num_steps": 40}))
  _say_what_resuming_changes(ConfigDict({"num_steps": 40}), str(tmp_path), 40)
  assert capsys.readouterr().err == (f"the run in {tmp_path} is at step 40 and num_steps is 40: nothing to "
                                     "train (a larger --config.num_steps continues it)\n")
  _say_what_resuming_changes(ConfigDict({"num_steps": 60}), str(tmp_path), 13)
  assert capsys.readouterr().err == (f"num_steps 60, where the run in {tmp_path} had 40: from step 13 the "
                                     "learning-rate schedule decays to step 60\n")
  _say_what_resuming_changes(ConfigDict({"num_steps": 40}), str(tmp_path), 13)  # as planned: nothing
  assert capsys.readouterr().err == ""


def _final_loss(workdir):
  return read_metrics(workdir)[-1]["train/loss"]


@pytest.mark.slow
def test_meshes_agree_with_one_device(corpus, tmp_path):
  config = write_config(tmp_path / "cfg.py", corpus, num_steps=4, log_every=4)
  code, _, err = run_train(config, tmp_path / "one", devices=1)
  assert code == 0, err[-3000:]
  reference = _final_loss(tmp_path / "one")
  for data, fsdp, tensor in ((8, 1, 1), (2, 2, 2), (1, 4, 2)):
    workdir = tmp_path / f"mesh{data}{fsdp}{tensor}"
    code, _, err = run_train(config, workdir, f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
                             f"--config.mesh.tensor={tensor}", devices=8)
    assert code == 0, err[-3000:]
    np.testing.assert_allclose(_final_loss(workdir), reference, rtol=1e-4)


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(corpus, tmp_path):
  config = write_config(tmp_path / "cfg.py", corpus, num_steps=6, log_every=2, checkpoint_every=3)
  code, _, err = run_train(config, tmp_path / "straight", devices=1)
  assert code == 0, err[-3000:]
  reference = _final_loss(tmp_path / "straight")
  # 3 steps on one mesh, then the rest on another device count and mesh shape
  code, _, err = run_train(config, tmp_path / "moved", "--config.num_steps=3", devices=8,
                           )
  assert code == 0, err[-3000:]
  code, _, err = run_train(config, tmp_path / "moved", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                           devices=4)
  assert code == 0, err[-3000:]
  np.testing.assert_allclose(_final_loss(tmp_path / "moved"), reference, rtol=1e-4)

  # A workdir saved sharded over 4 devices converts parameter by parameter to Hugging Face's format.
  import llama_jax
  from llama_jax.convert import cli as convert
  assert convert.main(["--input", str(tmp_path / "moved"), "--output", str(tmp_path / "hf"), "--to", "hf"]) == 0
  tokens = np.array([[1, 5, 9, 2]])
  np.testing.assert_allclose(llama_jax.load(tmp_path / "hf").logits(tokens),
                             llama_jax.load(tmp_path / "moved").logits(tokens), rtol=1e-6, atol=1e-6)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(corpus, tmp_path):
  # shard_by="replicated": both processes see the rows a single process would; the default split
  # (each host reads its own records) gives other, equally valid, batches.
  config = write_config(tmp_path / "cfg.py", corpus, num_steps=4, log_every=4)
  code, _, err = run_train(config, tmp_path / "single", "--config.data.shard_by=replicated", devices=8)
  assert code == 0, err[-3000:]
  port = _free_port()
  procs = [run_train(config, tmp_path / "multi", "--config.data.shard_by=replicated", devices=4, wait=False,
                     env={"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                          "JAX_PROCESS_ID": str(i)}) for i in range(2)]
  results = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  np.testing.assert_allclose(_final_loss(tmp_path / "multi"), _final_loss(tmp_path / "single"), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--config.model.n_heads=5"], "does not divide model.dim"),
    (["--config.model.n_kv_heads=3"], "does not divide model.n_heads"),
    (["--config.mesh.data=3"], "mesh"),
    (["--config.batch_size=12"], "does not divide over the 8 data-parallel devices"),
    (["--config.no_such_key=1"], "no_such_key"),
    (["--config.optimizer.lr=-1"], "optimizer.lr must be >= 0"),
])
def test_bad_configuration_is_one_line(corpus, tmp_path, flags, message):
  config = write_config(tmp_path / "cfg.py", corpus)
  code, _, err = run_train(config, tmp_path / "bad", *flags, devices=8)
  assert code != 0
  assert message in err, err
  assert "Traceback" not in err, err


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
  config = write_config(tmp_path / "cfg.py", corpus, num_steps=30, log_every=1, checkpoint_every=1)
  code, _, err = run_train(config, tmp_path / "nan", "--config.optimizer.lr=1e30",
                           "--config.optimizer.warmup_steps=1000", "--config.optimizer.clip_norm=1e30")
  assert code != 0
  assert "non-finite" in err and "Traceback" not in err, err[-3000:]
  import llama_jax
  model = llama_jax.load(tmp_path / "nan")
  assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(model.params))


@pytest.mark.slow
def test_init_from_own_workdir_fine_tunes_with_its_tokenizer(corpus, tmp_path):
  config = write_config(tmp_path / "cfg.py", corpus, num_steps=2, log_every=1)
  code, _, err = run_train(config, tmp_path / "base")
  assert code == 0, err[-3000:]
  code, _, err = run_train(config, tmp_path / "tuned", f"--config.init_from={tmp_path / 'base'}",
                           "--config.data.tokenizer=")
  assert code == 0, err[-3000:]
  base, tuned = read_metrics(tmp_path / "base"), read_metrics(tmp_path / "tuned")
  # starts from the base's weights: the first loss is the base's after its 2 steps, not a fresh init's
  assert tuned[0]["train/loss"] < base[0]["train/loss"]
  assert (tmp_path / "tuned" / "tokenizer.model").read_bytes() == (corpus / "tok.model").read_bytes()


@pytest.mark.slow
def test_out_of_device_memory_is_one_line_with_what_to_change(corpus, tmp_path, monkeypatch):
  """XLA's RESOURCE_EXHAUSTED from anywhere in a run (here: the training loop, stood in for, as a
  CPU does not run out) becomes `DeviceOutOfMemory`, a TrainingError (train.py prints it as one
  line): XLA's words, JAX's memory share and the config's knobs. Other runtime errors pass as they are."""
  import jax

  from llama_jax.errors import run_cli
  from llama_jax.train import loop
  from llama_jax.train.cli import check_config_file, load_config
  path = write_config(tmp_path / "cfg.py", corpus)
  check_config_file(path)
  config = load_config(path)
  xla = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 53.01GiB with allocator GPU_0_bfc "
         "on device 0. [tf-allocator-allocation-error=''] [executable_name='jit_train_step']")

  def fails_with(message):
    def loop_that_fails(*args, **kwargs):
      raise jax.errors.JaxRuntimeError(message)
    return loop_that_fails

  monkeypatch.setattr(loop, "_loop", fails_with(xla))
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  with pytest.raises(loop.DeviceOutOfMemory) as raised:
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(raised.value)
  assert "Out of memory while trying to allocate 53.01GiB with allocator GPU_0_bfc on device 0" in message
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95" in message and "batch_size (8;" in message
  assert "'none'" in message and "'float32'" in message  # the config's remat policy and moments
  assert "LLAMA_JAX_TRACEBACK=1" in message
  with pytest.raises(SystemExit):  # the command line: one line on stderr, exit 1
    run_cli(lambda: loop.train_and_evaluate(config, str(tmp_path / "run")), expected=(loop.TrainingError,))

  # a kernel launch's limits are not memory, though the words appear
  for other in ("INTERNAL: something else", "INTERNAL: Failed to launch: RESOURCE_EXHAUSTED: too many resources"):
    monkeypatch.setattr(loop, "_loop", fails_with(other))
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
      loop.train_and_evaluate(config, str(tmp_path / "run"))


def _two_processes(monkeypatch, others):
  """`process_allgather` as a run of two processes sees it: this process's value beside the
  other's, drawn from `others` one call after another."""
  values = iter(others)
  monkeypatch.setattr(loop.multihost_utils, "process_allgather",
                      lambda mine: np.stack([mine, np.array([next(values)], mine.dtype)]))


def test_processes_stop_together_at_the_first_ones_end(monkeypatch):
  # A process that went on alone would wait in the step's collectives for the one that stopped.
  _two_processes(monkeypatch, [False, True])  # the other process: one batch, then none
  batches = iter([{"x": 1}, {"x": 2}, {"x": 3}])
  assert loop.next_batch(batches, agree=True) == {"x": 1}
  assert loop.next_batch(batches, agree=True) is None


def test_a_validation_split_empty_on_one_process_stops_every_process(monkeypatch):
  # Checked before training: the process with data raises too, instead of training on and waiting.
  monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
  _two_processes(monkeypatch, [True])  # the other process's split gives no batch

  class Recipe:
    @staticmethod
    def make_iterator(config, tokenizer, split):
      yield {"x": 1}  # this process's split gives one

  config = ml_collections.ConfigDict(dict(eval_every=5, batch_size=2, seq_len=8))
  with pytest.raises(DataError, match="on every process"):
    loop._check_eval_data(config, Recipe, tokenizer=None)


def test_num_steps_0_counts_the_process_whose_data_end_first(monkeypatch):
  # Every process stops at the first one's end: the schedule must end there too.
  monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
  _two_processes(monkeypatch, [17, 0])  # the other process counts 17 batches, then (a second run) none
  assert loop._fewest_over_processes(20) == 17
  with pytest.raises(DataError, match="share of the training data gives no batch"):
    loop._fewest_over_processes(20)


def test_a_process_whose_share_of_the_data_fails_fails_every_process(monkeypatch):
  # An empty share raises in the packer (no StopIteration): the failing process must still take
  # part in the agreement, or the others wait for it in the allgather.
  def failing():
    raise DataError("no documents in any source of this split (for this process): e")
    yield

  _two_processes(monkeypatch, [0])  # the other process has its batch
  with pytest.raises(DataError, match="for this process"):
    loop.next_batch(failing(), agree=True)
  _two_processes(monkeypatch, [2])  # the other process's share failed
  with pytest.raises(DataError, match=r"the data of process\(es\) 1 failed"):
    loop.next_batch(iter([{"x": 1}]), agree=True)


def test_init_from_with_other_rotary_settings_is_said(capsys):
  # A converted Llama 3.1 fine-tuned with a config that forgot its rope scaling: said on stderr (not
  # refused: a context-extension fine-tune changes the positions on purpose). The same settings: silence.
  from llama_jax.config import ModelConfig
  from llama_jax.train.loop import ConfigError, check_shape
  ours = ModelConfig(dim=64, n_layers=2, n_heads=8, vocab_size=101, rope_theta=500000.0)
  llama31 = ours.replace(rope_scaling="llama3", rope_scaling_factor=8.0)
  check_shape(llama31, "init_from x", ours)
  err = capsys.readouterr().err
  assert "init_from x: this run's positions are not the checkpoint's" in err
  assert "model.rope_scaling none (the checkpoint's: llama3)" in err and "rope_scaling_factor" not in err
  check_shape(llama31, "init_from x", llama31)
  assert capsys.readouterr().err == ""
  with pytest.raises(ConfigError, match="model.n_layers is 2 in the config but 3 in the checkpoint"):
    check_shape(llama31.replace(n_layers=3), "init_from x", ours)
