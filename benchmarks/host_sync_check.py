"""Which constructs make a jitted call hold the host until the device is done? A call that returns
at once lets the host queue the next one while this one runs; one that blocks leaves the device
idle while the host prepares the next. Each function below runs ~N ms of matmuls; printed: how long
the Python call takes to return and how long until its output is ready (median of 5), per construct:

  plain         matmuls only
  cond          the same, then a `lax.cond` whose predicate is data (as `sampling.sample`'s)
  where         the cond's two branches both computed, one chosen by `jnp.where`
  loop_static   a `fori_loop` of 32 steps with a trip count known at compile time
  loop_cond     the same with a `lax.cond` in each step
  loop_data     a `fori_loop` whose trip count is data

  XLA_FLAGS=... python benchmarks/host_sync_check.py
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

N = 2048


def chain(x, w, n=8):
  for _ in range(n):
    x = jnp.tanh(x @ w)
  return x


def branch(x, flag):
  return jax.lax.cond(jnp.any(flag), lambda y: y * 2.0, lambda y: y, x)


FUNCTIONS = {
    "plain": lambda x, w, flag, n: chain(x, w),
    "cond": lambda x, w, flag, n: branch(chain(x, w), flag),
    "where": lambda x, w, flag, n: (lambda y: jnp.where(jnp.any(flag), y * 2.0, y))(chain(x, w)),
    "loop_static": lambda x, w, flag, n: jax.lax.fori_loop(0, 32, lambda i, y: chain(y, w, 1), x),
    "loop_cond": lambda x, w, flag, n: jax.lax.fori_loop(0, 32, lambda i, y: branch(chain(y, w, 1), flag), x),
    "loop_data": lambda x, w, flag, n: jax.lax.fori_loop(0, n, lambda i, y: chain(y, w, 1), x),
}


def main() -> None:
  x = jnp.asarray(np.random.default_rng(0).normal(size=(N, N)) / N ** 0.5, jnp.bfloat16)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(N, N)) / N ** 0.5, jnp.bfloat16)
  flag, n = jnp.zeros((4,), bool), jnp.int32(32)
  for name, fn in FUNCTIONS.items():
    f = jax.jit(fn)
    jax.block_until_ready(f(x, w, flag, n))
    returned, ready = [], []
    for _ in range(5):
      t0 = time.perf_counter()
      out = f(x, w, flag, n)
      returned.append(time.perf_counter() - t0)
      jax.block_until_ready(out)
      ready.append(time.perf_counter() - t0)
    print(json.dumps({"construct": name, "returns_ms": round(1000 * float(np.median(returned)), 3),
                      "ready_ms": round(1000 * float(np.median(ready)), 3),
                      "device": jax.devices()[0].device_kind}), flush=True)


if __name__ == "__main__":
  main()
