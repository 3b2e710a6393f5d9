"""Can programmatic dependent launch (PDL) bring a chain of batch-1 matvecs closer to the bandwidth?

An experiment for the GPU issue (decode at batch 1); nothing in the library uses it.

  python benchmarks/mgpu_matvec.py [--shapes 2560x2048,2048x2048,11264x2048,2048x5632] [--chain 22]
                                   [--block_o 0] [--check] [--lower_only]

A Pallas Mosaic GPU kernel computes y = W x (W bf16 stored (O, K), x and y bf16, float32
accumulation). Each program owns `block_o` rows of W: it issues TMA copies of them into shared
memory (in (block_o, 256) pieces, TMA's box limit) before anything else; with PDL it then calls
`griddepcontrol.launch_dependents` (the next kernel may start its own copies) and
`griddepcontrol.wait` (the previous kernel, which wrote x, has finished), and only then copies x.
Without PDL there are no griddepcontrol instructions and the kernel runs after its predecessor, as
Pallas-Triton's do today. JAX >= 0.11 launches a Mosaic GPU kernel that waits with the PDL launch
attribute (jax commit 5c65d574, "Add PDL kernel launch integration"); 0.10 does not, so there the
pdl=True kernels run serialized like the others.

On a GPU, one JSON line per measurement:
  check    (--check) each kernel's max abs error against XLA's product on random data
  kernel   each shape alone: enough copies of W (independent calls, one program) to pass 256 MB,
           host-timed median of the program divided by the copies; µs and TB/s on W's bytes
  chain    the four products of a layer --chain times in one program, each x the previous
           product's output (its first K elements: every K is at most the previous O), so each
           kernel's wait guards a real dependence; µs per layer and TB/s on all W bytes
  check_chain  (--check) the chain's output with pdl on against pdl off (must be exactly equal:
           a difference means a kernel read x too early) and against XLA's (roundings compound)
each for the Mosaic GPU kernel with pdl off and on and for XLA (`einsum`, float32 accumulation).
--block_o sets the rows a program for every shape (0: `pick_block_o`, which the lines report).
Without a GPU (or with --lower_only) it only lowers every kernel and the chain for CUDA.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax.bench.common import median_call_us  # noqa: E402

PIECE = 256  # TMA copies at most 256 elements along a dimension
VECTOR = 8  # bf16 elements per 16-byte shared-memory load
ROWS_PER_TILE = 4  # one row of a tile per warp of the warpgroup
MAX_BLOCK_SMEM = 100 * 1024  # two programs fit an SM, so the next one's copies overlap this one's tail
H100_SMS = 132
ALONE_BYTES = 256e6  # weight copies timed in one program: several times L2 (50 MB), as in a decode


def weight_layout():
  """(rows, PIECE): a row per warp, 32 lanes across the row, 8 contiguous elements a lane."""
  return plgpu.Layout.TILED(plgpu.Tiling(((ROWS_PER_TILE, PIECE), (VECTOR,))),
                            warp_dims=(-3,), lane_dims=(-2,), vector_dim=-1)


def x_layout():
  """(PIECE,): the weight layout without its rows, so x broadcasts onto it in registers."""
  return plgpu.Layout.TILED(plgpu.Tiling(((PIECE,), (VECTOR,))),
                            warp_dims=(plgpu.Replicated(ROWS_PER_TILE),), lane_dims=(-2,),
                            vector_dim=-1)


def block_smem_bytes(block_o: int, k: int) -> int:
  return (block_o + 1) * k * 2


def pick_block_o(o: int, k: int, num_sms: int) -> int:
  """The rows per program that spread W's bytes most evenly over the SMs (fewest rows on the busiest
  SM), within MAX_BLOCK_SMEM; among equals the largest, since every program also copies x."""
  candidates = [b for b in range(8, 65, ROWS_PER_TILE)
                if o % b == 0 and block_smem_bytes(b, k) <= MAX_BLOCK_SMEM]
  if not candidates:
    raise ValueError(f"no block of rows fits {o}x{k}")
  return min(candidates, key=lambda b: (math.ceil(o // b / num_sms) * b, -b))


@functools.partial(jax.jit, static_argnames=("k", "block_o", "pdl"))
def matvec(x, w, *, k, block_o, pdl):
  """y = w @ x[:k] on Mosaic GPU; x may be longer than k (the previous product's output)."""
  o = w.shape[0]
  pieces = k // PIECE
  assert w.shape[1] == k and k % PIECE == 0 and x.shape[0] % PIECE == 0 and o % block_o == 0

  def body(x_ref, w_ref, y_ref, w_smem, x_smem, barriers):
    # barriers[j] for W's piece j, barriers[pieces] for x (one array: a lone Barrier is a 0-d ref).
    w_barriers, x_barrier = barriers, barriers.at[pieces]
    rows = pl.ds(jax.lax.axis_index("o") * block_o, block_o)
    # W does not depend on the previous kernel: start streaming it before waiting for that kernel.
    for j in range(pieces):
      plgpu.copy_gmem_to_smem(w_ref.at[rows, pl.ds(j * PIECE, PIECE)], w_smem.at[j],
                              w_barriers.at[j])
    if pdl:
      plgpu.griddepcontrol_launch_dependents()
      plgpu.griddepcontrol_wait()
    plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, pieces)], x_smem, x_barrier)
    plgpu.barrier_wait(x_barrier)
    products = None
    for j in range(pieces):  # each piece as soon as it lands, while the later ones still stream
      plgpu.barrier_wait(w_barriers.at[j])
      w_piece = plgpu.load(w_smem.at[j], (), layout=weight_layout()).astype(jnp.float32)
      x_piece = plgpu.load(x_smem.at[j], (), layout=x_layout()).astype(jnp.float32)
      x_rows = plgpu.layout_cast(jax.lax.broadcast_in_dim(x_piece, w_piece.shape, (1,)),
                                 weight_layout())
      products = w_piece * x_rows if products is None else products + w_piece * x_rows
    # Across K once at the end: within a thread, then a shuffle across the warp's lanes.
    y_ref[rows] = jnp.sum(products, axis=1).astype(y_ref.dtype)

  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((o,), w.dtype), grid=(o // block_o,), grid_names=("o",),
      scratch_types=[plgpu.SMEM((pieces, block_o, PIECE), w.dtype),
                     plgpu.SMEM((pieces, PIECE), x.dtype),
                     plgpu.Barrier(num_barriers=pieces + 1)],
  )(x.reshape(-1, PIECE), w)  # rows of PIECE: a TMA box per program (the reshape is a bitcast)


@functools.partial(jax.jit, static_argnames=("k",))
def xla_matvec(x, w, *, k):
  return jnp.einsum("k,ok->o", x[:k], w, preferred_element_type=jnp.float32).astype(w.dtype)


def product(impl: str, block_os: dict, pdl: bool):
  """impl "mgpu" or "xla" as a function of (x, w); block_os maps (O, K) to rows a program."""
  if impl == "xla":
    return lambda x, w: xla_matvec(x, w, k=w.shape[1])
  return lambda x, w: matvec(x, w, k=w.shape[1], block_o=block_os[w.shape], pdl=pdl)


def chain(x, layers, apply):
  """Every layer's products in order, each on the previous output (sliced to its K)."""
  for layer in layers:
    for w in layer:
      x = apply(x, w)
  return x


def independent(xs, ws, apply):
  # A vector each, or XLA's dot merger could fuse the products that share x into one.
  return tuple(apply(x, w) for x, w in zip(xs, ws))


def emit(**fields) -> None:
  print(json.dumps(fields), flush=True)


def random_weights(key, shape):
  # Scaled so the chain's activations stay near 1 instead of overflowing bf16.
  return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[1])).astype(jnp.bfloat16)


def lower_only(shapes, block_os, chain_length: int) -> None:
  cuda = dict(lowering_platforms=("cuda",))
  for o, k in shapes:
    x = jax.ShapeDtypeStruct((max(k, o),), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((o, k), jnp.bfloat16)
    for pdl in (False, True):
      fn = functools.partial(matvec, k=k, block_o=block_os[(o, k)], pdl=pdl)
      jax.jit(fn).trace(x, w).lower(**cuda).as_text()
      print(f"lowered {o}x{k} pdl={pdl} block_o={block_os[(o, k)]}", flush=True)
  layers = [[jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]] * chain_length
  x0 = jax.ShapeDtypeStruct((shapes[-1][0],), jnp.bfloat16)
  for pdl in (False, True):
    fn = jax.jit(functools.partial(chain, apply=product("mgpu", block_os, pdl)))
    fn.trace(x0, layers).lower(**cuda).as_text()
    print(f"lowered chain x{chain_length} pdl={pdl}", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="2560x2048,2048x2048,11264x2048,2048x5632")
  parser.add_argument("--chain", type=int, default=22)
  parser.add_argument("--block_o", type=int, default=0, help="rows a program; 0: pick_block_o")
  parser.add_argument("--check", action="store_true")
  parser.add_argument("--lower_only", action="store_true")
  args = parser.parse_args()
  shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
  for (_, k), (o_prev, _) in zip(shapes, shapes[-1:] + shapes[:-1]):
    if k > o_prev:
      raise ValueError(f"K={k} exceeds the previous product's O={o_prev}: the chain truncates x")
  on_gpu = jax.default_backend() == "gpu"
  num_sms = getattr(jax.devices()[0], "core_count", H100_SMS) if on_gpu else H100_SMS
  block_os = {(o, k): args.block_o or pick_block_o(o, k, num_sms) for o, k in shapes}
  if args.lower_only or not on_gpu:
    lower_only(shapes, block_os, args.chain)
    return

  variants = [("mgpu", False), ("mgpu", True), ("xla", None)]
  keys = (jax.random.fold_in(jax.random.key(0), i) for i in itertools.count())
  x_long = jax.random.normal(next(keys), (max(o for o, _ in shapes),), jnp.bfloat16)
  for o, k in shapes:
    base = dict(shape=f"{o}x{k}", block_o=block_os[(o, k)])
    if args.check:
      w = random_weights(next(keys), (o, k))
      want = xla_matvec(x_long, w, k=k).astype(jnp.float32)
      for pdl in (False, True):
        got = matvec(x_long, w, k=k, block_o=block_os[(o, k)], pdl=pdl).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(got - want)))
        # Both round a float32 sum to bf16: at most about one bf16 ulp (2**-7 relative) apart.
        tolerance = float(jnp.max(jnp.abs(want))) * 2.0**-7
        emit(what="check", **base, pdl=pdl, max_abs_err=err, ok=err <= tolerance)
    copies = max(1, math.ceil(ALONE_BYTES / (o * k * 2)))
    ws = [random_weights(next(keys), (o, k)) for _ in range(copies)]
    xs = [jax.random.normal(next(keys), x_long.shape, jnp.bfloat16) for _ in range(copies)]
    for impl, pdl in variants:
      fn = jax.jit(functools.partial(independent, apply=product(impl, block_os, pdl)))
      us = median_call_us(fn, xs, ws) / copies
      emit(what=f"kernel_{impl}", **base, pdl=pdl, copies=copies, us=round(us, 2),
           tb_per_s=round(o * k * 2 / us / 1e6, 3))
    del xs, ws

  layers = [[random_weights(next(keys), s) for s in shapes] for _ in range(args.chain)]
  layer_bytes = sum(o * k * 2 for o, k in shapes)
  x0 = x_long[:shapes[-1][0]]
  outputs = {}
  for impl, pdl in variants:
    fn = jax.jit(functools.partial(chain, apply=product(impl, block_os, pdl)))
    outputs[impl, pdl] = fn(x0, layers).astype(jnp.float32)
    us = median_call_us(fn, x0, layers) / args.chain
    emit(what=f"chain_{impl}", shape="layer", pdl=pdl, layers=args.chain, us=round(us, 2),
         tb_per_s=round(layer_bytes / us / 1e6, 3))
  if args.check:
    # The kernels are deterministic, so pdl on must match pdl off exactly; a difference means a
    # kernel read x before its producer had finished. XLA's differs by roundings compounded.
    for reference in (("mgpu", False), ("xla", None)):
      err = float(jnp.max(jnp.abs(outputs["mgpu", True] - outputs[reference])))
      emit(what="check_chain", against=reference[0], pdl=True, layers=args.chain,
           max_abs_err=err, max_abs=float(jnp.max(jnp.abs(outputs[reference]))))


if __name__ == "__main__":
  main()
