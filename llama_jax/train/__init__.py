"""Training: `python train.py` pretrains and fine-tunes through `train_and_evaluate`.

  step       the pure, jitted `train_step(state, batch) -> (state, metrics)` and `eval_step`
  loss       the masked float32 next-token cross-entropy (whole or in sequence chunks)
  optimizer  AdamW with warmup, cosine decay and global-norm clipping (optax)
  loop       the run: mesh, sharded state, data, evaluation, checkpoints, signals
  workdir    the run's directory: one run at a time (a lock), checked before a byte is written
  metrics    FLOPs, MFU, the step timer and the one metrics writer (JSON lines + TensorBoard)
  cli        `train.py`'s command line: the config file, its overrides and --help
"""

from llama_jax.train.loop import DeviceOutOfMemory, TrainingError, train_and_evaluate

__all__ = ["DeviceOutOfMemory", "TrainingError", "train_and_evaluate"]
