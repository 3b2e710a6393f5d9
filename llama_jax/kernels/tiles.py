"""What Triton asks of a kernel's tiles, for the Pallas kernels here: its dot multiplies tiles of
at least 16 rows whose sides are powers of two (fewer rows are padded and masked), and the kernels
accumulate products in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def dot_rows(rows: int) -> int:
  """The rows a tile of `rows` is padded to for Triton's dot: a power of two, at least 16."""
  return max(16, 1 << (rows - 1).bit_length())


def dot(a: Array, b: Array, b_contracted: int = 0) -> Array:
  """a @ b (b_contracted 0) or a @ b.T (1), accumulated in float32."""
  return jax.lax.dot_general(a, b, (((1,), (b_contracted,)), ((), ())), preferred_element_type=jnp.float32)
