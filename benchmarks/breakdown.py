"""Where a training step's time goes: each piece timed alone on the GPU (TinyLlama shape, bf16).

  python benchmarks/breakdown.py [--config.key=value ...]

Prints one line per piece (milliseconds) and the matmul ceiling measured on these exact shapes.
"""

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from ml_collections import config_flags

from llama_jax import sharding
from llama_jax.config import ModelConfig
from llama_jax.train.step import _loss_sums
from llama_jax.train.loop import make_training

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tinyllama_1b.py", "Config file.")


def timed(fn, *args, n=10):
  out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(n):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n * 1e3


def main(_):
  config = _CONFIG.value
  cfg = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  run = make_training(config, cfg, mesh)
  b, t = config.batch_size, config.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (b, t + 1), dtype=np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
           "segment_ids": np.zeros((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32)}
  rows = {}
  with sharding.activation_rules(mesh, config.mesh.rules):
    batch = jax.device_put(batch, run.batch_sharding)
    state = run.init(jax.random.key(0))
    loss = functools.partial(_loss_sums, cfg=cfg, batch=batch, z_loss=0.0, document_attention=False)
    rows["forward"] = timed(jax.jit(lambda p: loss(p)[0]), state.params)
    grad_fn = jax.jit(jax.grad(lambda p: loss(p)[0]))
    rows["forward+backward"] = timed(grad_fn, state.params)
    grads = grad_fn(state.params)
    upd = jax.jit(lambda g, s, p: run.tx.update(g, s, p))
    rows["optimizer update"] = timed(upd, grads, state.opt_state, state.params)
    s = state
    s, m = run.step(s, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(10):
      s, m = run.step(s, batch)
    jax.block_until_ready(m)
    rows["train step"] = (time.perf_counter() - t0) / 10 * 1e3

  # matmul ceiling on the model's own shapes: (B*T, D) x (D, F) and (B*T, D) x (D, D)
  bt = b * t
  for name, (m_, k_, n_) in {"ffn_up (BT,D)x(D,F)": (bt, cfg.dim, cfg.hidden_dim),
                             "wq (BT,D)x(D,D)": (bt, cfg.dim, cfg.dim),
                             "head (BT,D)x(D,V)": (bt, cfg.dim, cfg.vocab_size)}.items():
    x = jax.random.normal(jax.random.key(1), (m_, k_), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (k_, n_), jnp.bfloat16)
    ms = timed(jax.jit(lambda a, c: a @ c), x, w, n=50)
    rows[f"matmul {name} TFLOP/s"] = 2 * m_ * k_ * n_ / ms / 1e9

  if jax.default_backend() == "gpu":
    rows.update(_attention(b, t, cfg))
  for key, value in rows.items():
    print(f"{key:45s} {value:10.2f}")
  print(json.dumps({k: round(v, 2) for k, v in rows.items()}))


def _attention(b, t, cfg):
  rows = {}
  q = jax.random.normal(jax.random.key(3), (b, t, cfg.n_heads, cfg.head_dim), jnp.bfloat16)
  k = jax.random.normal(jax.random.key(4), (b, t, cfg.n_kv_heads, cfg.head_dim), jnp.bfloat16)
  attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  rows["cudnn attention fwd (one layer)"] = timed(jax.jit(attn), q, k, k)
  g = jax.jit(jax.grad(lambda q, k, v: attn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
  rows["cudnn attention fwd+bwd (one layer)"] = timed(g, q, k, k)
  return rows


if __name__ == "__main__":
  app.run(main)
