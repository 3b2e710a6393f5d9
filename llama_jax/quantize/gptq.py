"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), as a solver over one layer's weight and Hessian.

Quantizes the inputs of a weight W one at a time (Optimal Brain Quantization) and spreads each
one's rounding error over the inputs not yet quantized, weighted by the inverse Hessian of the
layer's reconstruction error ||X W - X Q||^2, H = 2 X^T X / n (algorithm 1 of the paper):

  H += damp * mean(diag H) * I;  U = chol(H^-1)^T (upper)        the Cholesky form of the inverse
  for each block of B inputs (the lazy batch):
    for each input i of the block:
      q_i = quant(w_i);  e_i = (w_i - q_i) / U_ii
      w_j -= U_ij e_i          for the block's later inputs j
    w_j -= sum_i U_ij e_i      for all later inputs, once per block (one matmul)

Groups (`group_size`) take their grid from the weight as it stands when the group's first input
is reached, as the reference `gptq.py` does. With act-order the inputs are visited by decreasing
diag(H), and the groups' grids are fixed beforehand from the unquantized weight (the reference's
`static_groups`), so that a group still means `group_size` consecutive inputs on disk.

Our weights are (inputs, outputs), the transpose of the paper's (rows = outputs), so its column i
is our row i. Output channels are independent given H: the solver shards over them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from llama_jax.quantize import grid

Array = jax.Array


def inverse_hessian_factor(h: Array, damp: float) -> Array:
  """U upper triangular with U^T U = (H + damp * mean(diag H) I)^-1."""
  k = h.shape[0]
  h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k, dtype=h.dtype)
  hinv = cho_solve((jnp.linalg.cholesky(h), True), jnp.eye(k, dtype=h.dtype))
  return jnp.linalg.cholesky(hinv).T


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "block_size",
                                             "act_order"))
def gptq(w: Array, h: Array, *, bits: int, group_size: int, symmetric: bool, damp: float = 0.01,
         block_size: int = 128, act_order: bool = False) -> tuple[Array, Array, Array]:
  """w (K, O) one layer's weight, h (K, K) the Hessian of its inputs. Returns integers q (K, O)
  float32 in [0, 2^bits - 1], scales and zero points (K / group_size, O)."""
  k, o = w.shape
  n_groups = k // group_size
  w = w.astype(jnp.float32)
  h = h.astype(jnp.float32)
  dead = jnp.diagonal(h) == 0  # inputs never active: any value will do, so 0
  h = h + jnp.diag(dead.astype(h.dtype))
  w = jnp.where(dead[:, None], 0.0, w)

  if act_order:
    static_scales, static_zeros = grid.params(w.reshape(n_groups, group_size, o), bits, symmetric)
    perm = jnp.argsort(-jnp.diagonal(h), stable=True)
    w, h = w[perm], h[perm][:, perm]
  else:
    perm = jnp.arange(k)
  u = inverse_hessian_factor(h, damp)

  # Padded to whole blocks: zero weights on an identity Hessian, coupled to nothing.
  kp = -(-k // block_size) * block_size
  w = jnp.pad(w, ((0, kp - k), (0, 0)))
  u = jnp.pad(u, ((0, kp - k), (0, kp - k))) + jnp.diag((jnp.arange(kp) >= k).astype(u.dtype))
  group_of = jnp.pad(perm // group_size, (0, kp - k))  # the group each visited input belongs to

  def block(b, carry):
    w, q, scales, zeros, scale, zero = carry  # scale, zero: the grid of the group in progress
    i1 = b * block_size
    w1 = jax.lax.dynamic_slice(w, (i1, 0), (block_size, o))
    u1 = jax.lax.dynamic_slice(u, (i1, i1), (block_size, block_size))

    def column(i, c):
      w1, q1, err1, scales, zeros, scale, zero = c
      j = i1 + i
      if act_order:
        scale, zero = static_scales[group_of[j]], static_zeros[group_of[j]]
      else:
        # A group starting here takes its grid from the weight as of this block's start.
        starts = (j % group_size == 0) & (j < k)
        new_scale, new_zero = grid.params(
            jax.lax.dynamic_slice(w, (jnp.minimum(j, kp - group_size), 0), (group_size, o)),
            bits, symmetric)
        scale, zero = jnp.where(starts, new_scale, scale), jnp.where(starts, new_zero, zero)
        scales = scales.at[j // group_size].set(scale, mode="drop")
        zeros = zeros.at[j // group_size].set(zero, mode="drop")
      x = w1[i]
      qi = grid.quantize(x, scale, zero, bits)
      err = (x - grid.dequantize(qi, scale, zero)) / u1[i, i]
      w1 = w1 - u1[i][:, None] * err[None, :]  # U is upper triangular: rows >= i only
      return w1, q1.at[i].set(qi), err1.at[i].set(err), scales, zeros, scale, zero

    zeros_bo = jnp.zeros((block_size, o), jnp.float32)
    init = (w1, zeros_bo, zeros_bo, scales, zeros, scale, zero)
    _, q1, err1, scales, zeros, scale, zero = jax.lax.fori_loop(0, block_size, column, init)
    # The block's errors reach every later input in one matmul (rows before the block have zero
    # coefficients; the block's own rows are done and no longer read).
    u_rows = jax.lax.dynamic_slice(u, (i1, 0), (block_size, kp))
    w = w - jnp.einsum("BK,BO->KO", u_rows, err1)
    return w, jax.lax.dynamic_update_slice(q, q1, (i1, 0)), scales, zeros, scale, zero

  groups = jnp.zeros((n_groups, o), jnp.float32)
  init = (w, jnp.zeros((kp, o), jnp.float32), groups, groups, jnp.ones((o,), jnp.float32),
          jnp.zeros((o,), jnp.float32))
  _, q, scales, zeros, _, _ = jax.lax.fori_loop(0, kp // block_size, block, init)
  q = q[:k]
  if act_order:
    q = q[jnp.argsort(perm)]
    scales, zeros = static_scales, static_zeros
  return q, scales, zeros
