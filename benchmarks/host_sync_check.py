"""Which constructs make a jitted call hold the host until the device is done? A call that returns
at once lets the host queue the next one while this one runs; one that blocks leaves the device
idle while the host prepares the next. Each function runs a few ms of matmuls first, then the
construct on (64, 32000) logits made from them; printed: how long the Python call takes to return
and how long until its output is ready (median of 5):

  plain         the matmuls only
  cond          then a `lax.cond` whose predicate is data (an input)
  top_k         then `lax.top_k(logits, 20)` (the prefill's most likely alternatives)
  sample        then `sampling.sample` with greedy rows (its conds: any sampled row, any cut)
  draw          then `slots._draw` (sample, log-softmax, top 20): what a prefill call ends with
  scatter       then a scatter into a (64, 4, 1024, 64) cache at (rows, positions) with mode="drop"
                (how a prefill writes its keys and values)
  cudnn         then cuDNN flash attention (causal) on (4, 1024, 32, 64) queries
  cudnn_mask    the same with an explicit mask (prompts packed side by side)
  pallas        then the ragged decode-attention kernel (Pallas/Triton) on a (64, 4, 1024, 64) cache
  loop_static   a `fori_loop` of 32 steps, trip count known at compile time
  loop_pallas   the same with the ragged decode-attention kernel in each step
  loop_cond     the same with a `lax.cond` in each step
  loop_data     a `fori_loop` whose trip count is data

Then what the sampler's parts cost alone on (64, 32000) logits (ms a call, back to back): the
top-k/top-p cut (a sort a row), one categorical draw a row, `sample` for greedy rows (its cond
skips the rest), and `sample` for sampled rows with a cut.

  XLA_FLAGS=... python benchmarks/host_sync_check.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax.generate import slots  # noqa: E402
from llama_jax import model as M  # noqa: E402
from llama_jax.generate.sampling import SamplingParams, sample, top_k_top_p_mask  # noqa: E402
from llama_jax.kernels import decode_attention  # noqa: E402

N, ROWS, VOCAB = int(os.environ.get("HOST_SYNC_N", 4096)), 64, 32000


def chain(x, w, n=32):
  for _ in range(n):
    x = jnp.tanh(x @ w)
  return x


def logits(x, head):
  return (x[:ROWS] @ head).astype(jnp.float32)  # (64, 32000)


def branch(x, flag):
  return jax.lax.cond(jnp.any(flag), lambda y: y * 2.0, lambda y: y, x)


def scatter(x):
  cache = jnp.zeros((ROWS, 4, 1024, 64), jnp.bfloat16)
  rows = jnp.broadcast_to(jnp.arange(4)[:, None], (4, 1024)) * 16
  positions = jnp.broadcast_to(jnp.arange(1024), (4, 1024))
  values = jnp.broadcast_to(x[:4, :64].reshape(4, 1, 1, 64), (4, 1024, 4, 64))
  return cache.at[rows, :, positions].set(values, mode="drop")


def attention(x, mask: bool):
  q = jnp.broadcast_to(x[:4, :64].reshape(4, 1, 1, 64), (4, 1024, 32, 64))
  k = jnp.broadcast_to(x[4:8, :64].reshape(4, 1, 1, 64), (4, 1024, 4, 64))
  if not mask:
    return M.cudnn_attention(q, k, k, None)
  positions = jnp.broadcast_to(jnp.arange(1024) % 256, (4, 1024))
  return M.cudnn_attention(q, k, k, M.attention_mask(positions, positions, positions // 256, positions // 256))


def ragged(x):
  q = jnp.broadcast_to(x[:64, :64].reshape(64, 1, 1, 64), (64, 1, 32, 64))
  cache = jnp.broadcast_to(x[:64, :64].reshape(64, 1, 1, 64), (64, 4, 1024, 64))
  return decode_attention.ragged_decode_attention(q, cache, cache, jnp.arange(64) * 16 + 1)


GREEDY = SamplingParams(jnp.zeros((ROWS,)), jnp.zeros((ROWS,), jnp.int32), jnp.ones((ROWS,)))
KEYS = jax.vmap(slots.row_key)(jnp.arange(ROWS))

FUNCTIONS = {
    "plain": lambda x, w, head, flag, n: chain(x, w),
    "cond": lambda x, w, head, flag, n: branch(chain(x, w), flag),
    "top_k": lambda x, w, head, flag, n: jax.lax.top_k(logits(chain(x, w), head), 20),
    "sample": lambda x, w, head, flag, n: sample(logits(chain(x, w), head), KEYS, GREEDY),
    "draw": lambda x, w, head, flag, n: slots._draw(logits(chain(x, w), head), KEYS, jnp.zeros((ROWS,), jnp.int32),
                                                    GREEDY, 20),
    "scatter": lambda x, w, head, flag, n: scatter(chain(x, w)),
    "cudnn": lambda x, w, head, flag, n: attention(chain(x, w), False),
    "cudnn_mask": lambda x, w, head, flag, n: attention(chain(x, w), True),
    "pallas": lambda x, w, head, flag, n: ragged(chain(x, w)),
    "loop_pallas": lambda x, w, head, flag, n: jax.lax.fori_loop(
        0, 32, lambda i, y: y + ragged(chain(y, w, 1)).reshape(64, -1)[:, :1].astype(y.dtype).sum(), x),
    "loop_static": lambda x, w, head, flag, n: jax.lax.fori_loop(0, 32, lambda i, y: chain(y, w, 1), x),
    "loop_cond": lambda x, w, head, flag, n: jax.lax.fori_loop(0, 32, lambda i, y: branch(chain(y, w, 1), flag), x),
    "loop_data": lambda x, w, head, flag, n: jax.lax.fori_loop(0, n, lambda i, y: chain(y, w, 1), x),
}


def main() -> None:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(N, N)) / N ** 0.5, jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(N, N)) / N ** 0.5, jnp.bfloat16)
  head = jnp.asarray(rng.normal(size=(N, VOCAB)) / N ** 0.5, jnp.bfloat16)
  flag, n = jnp.zeros((4,), bool), jnp.int32(32)
  gpu_only = {"cudnn", "cudnn_mask", "pallas", "loop_pallas"}
  for name, fn in FUNCTIONS.items():
    if name in gpu_only and jax.default_backend() != "gpu":
      continue
    f = jax.jit(fn)
    jax.block_until_ready(f(x, w, head, flag, n))
    returned, ready = [], []
    for _ in range(5):
      t0 = time.perf_counter()
      out = f(x, w, head, flag, n)
      returned.append(time.perf_counter() - t0)
      jax.block_until_ready(out)
      ready.append(time.perf_counter() - t0)
    print(json.dumps({"construct": name, "returns_ms": round(1000 * float(np.median(returned)), 3),
                      "ready_ms": round(1000 * float(np.median(ready)), 3),
                      "device": jax.devices()[0].device_kind}), flush=True)
  sampler_costs()


def sampler_costs(calls: int = 20) -> None:
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(ROWS, VOCAB)), jnp.float32)
  sampled = SamplingParams(jnp.full((ROWS,), 0.8), jnp.full((ROWS,), 40, jnp.int32), jnp.full((ROWS,), 0.9))
  parts = {
      "cut": lambda l: top_k_top_p_mask(l, sampled.top_k, sampled.top_p),
      "categorical": lambda l: jax.vmap(jax.random.categorical)(KEYS, l),
      "sample_greedy": lambda l: sample(l, KEYS, GREEDY),
      "sample_cut": lambda l: sample(l, KEYS, sampled),
  }
  for name, fn in parts.items():
    f = jax.jit(fn)
    jax.block_until_ready(f(logits))
    t0 = time.perf_counter()
    for _ in range(calls):
      out = f(logits)
    jax.block_until_ready(out)
    print(json.dumps({"sampler_part": name, "ms": round(1000 * (time.perf_counter() - t0) / calls, 4),
                      "rows": ROWS, "vocab": VOCAB, "device": jax.devices()[0].device_kind}), flush=True)


if __name__ == "__main__":
  main()
