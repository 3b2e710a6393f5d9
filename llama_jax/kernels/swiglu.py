"""SwiGLU's hidden layer silu(gate) * up for training, its backward as one Pallas pass (Triton on
GPUs) that reads gate, up and the cotangent once and writes both gradients.

XLA runs autodiff's backward as two fusions (d_up = silu(gate) d, and d_gate), each reading gate and
the cotangent, d_gate reading up too: seven passes over (tokens, hidden) where five suffice; with
the forward's three, 10.3 ms of a TinyLlama step on an H200 (BENCHMARKS.md, session 15). A backward
written out in jnp is fused the same way (measured). The forward stays XLA's (one pass already).

`model.swiglu_impl = "pallas"` uses it where `supported`; on a CPU the kernel runs in Pallas'
interpreter (tests only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

BLOCK = 1024  # elements a program, of the flattened (tokens, hidden) arrays
NUM_WARPS = 4


def supported(size: int) -> bool:
  """Whole blocks of the flattened arrays."""
  return size % BLOCK == 0


def swiglu(gate: Array, up: Array, interpret: bool | None = None) -> Array:
  """silu(gate) * up, in gate's dtype (any shape, `supported` sizes)."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if gate.shape != up.shape or not supported(gate.size):
    raise ValueError(f"swiglu takes gate and up of one shape in whole blocks of {BLOCK} elements, got "
                     f"{gate.shape} and {up.shape}")
  return _swiglu(gate, up, bool(interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _swiglu(gate, up, interpret):
  del interpret
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up, interpret):
  return _swiglu(gate, up, interpret), (gate, up)


def _swiglu_bwd(interpret, residuals, d):
  """d_up = silu(gate) d; d_gate = up d s (1 + gate (1 - s)), s = sigmoid(gate); float32 inside."""
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
  gate, up = residuals
  shape, n = gate.shape, gate.size

  def kernel(gate_ref, up_ref, d_ref, dgate_ref, dup_ref):
    g, u, dd = (r[...].astype(jnp.float32) for r in (gate_ref, up_ref, d_ref))
    s = jax.nn.sigmoid(g)
    dup_ref[...] = (dd * g * s).astype(dup_ref.dtype)
    dgate_ref[...] = (dd * u * s * (1 + g * (1 - s))).astype(dgate_ref.dtype)

  block = pl.BlockSpec((BLOCK,), lambda i: (i,))
  dgate, dup = pl.pallas_call(
      kernel, grid=(n // BLOCK,), in_specs=[block] * 3, out_specs=[block] * 2,
      out_shape=[jax.ShapeDtypeStruct((n,), gate.dtype), jax.ShapeDtypeStruct((n,), up.dtype)],
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name="swiglu_backward")(
          gate.reshape(-1), up.reshape(-1), d.astype(gate.dtype).reshape(-1))
  return dgate.reshape(shape), dup.reshape(shape)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
