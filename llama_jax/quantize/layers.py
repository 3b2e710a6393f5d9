"""The model pass: every projection of every block quantized, and the output head if asked.

Round-to-nearest needs no data. GPTQ follows the reference `llama.py` (`llama_sequential` with
`--true-sequential`): the calibration windows are embedded once, then each block in turn
  1. gathers the Hessian H = 2 X^T X / n of the inputs of q/k/v, quantizes them with `gptq`;
  2. runs the block again (q/k/v now quantized) for the input of wo, quantizes it; likewise
     w1/w3 (gate and up), then w2;
  3. runs the quantized block over the calibration activations, giving the next block its inputs,
so each projection is fitted to the errors of everything quantized before it. The inputs are read
through `model._project`'s `projection_inputs` collection; a Hessian is summed batch by batch, so
only one block's activations of the calibration set are held at a time.

Each projection's relative reconstruction error on the calibration data,
||X (W - Q)||^2 / ||X W||^2 = tr(dW^T H dW) / tr(W^T H W), is reported beside round-to-nearest's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llama_jax import model as M
from llama_jax import projection
from llama_jax.config import ModelConfig
from llama_jax.quantize import rtn
from llama_jax.quantize.gptq import gptq
from llama_jax.quantize.grid import Grid

METHODS = ("rtn", "gptq")


@dataclasses.dataclass(frozen=True)
class Options:
  method: str = "rtn"  # "rtn" or "gptq"
  quantize_output: bool = False  # the output head too (never the embedding)
  act_order: bool = False  # GPTQ: inputs by decreasing Hessian diagonal
  damp: float = 0.01  # GPTQ: dampening, a fraction of the mean Hessian diagonal
  block_size: int = 128  # GPTQ: the lazy batch
  batch_size: int = 8  # calibration windows per forward pass

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
    if not 0 <= self.damp < 1 or self.block_size < 1 or self.batch_size < 1:
      raise ValueError("damp must lie in [0, 1), block_size and batch_size must be positive")


def check_widths(cfg: ModelConfig, grid: Grid, quantize_output: bool) -> None:
  """Every projection's group size, checked before any work: one clear line for the first misfit."""
  shapes = M.param_shapes(cfg)
  for name, (module, n_in) in M.PROJECTIONS.items():
    shape = shapes["layers"]["block"][module][name].value.shape[1:]
    grid.group_size_for(math.prod(shape[:n_in]), f"{module}.{name}")
  if quantize_output:
    if cfg.tie_embeddings:
      raise ValueError("the output head is the embedding (tie_embeddings), which stays unquantized")
    grid.group_size_for(cfg.dim, "output")


def _relative_error(w: jax.Array, approx: jax.Array, h: jax.Array) -> jax.Array:
  d = w - approx
  hd = jnp.einsum("KJ,JO->KO", h, d, precision="highest")
  hw = jnp.einsum("KJ,JO->KO", h, w, precision="highest")
  return jnp.sum(d * hd) / jnp.sum(w * hw)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "damp", "block_size",
                                             "act_order"))
def _solve(w: jax.Array, h: jax.Array, *, bits: int, group_size: int, symmetric: bool, damp: float,
           block_size: int, act_order: bool):
  """GPTQ on w (K, O): (its QuantizedTensor of shape (K, O), relative error, round-to-nearest's)."""
  q, scales, zeros = gptq(w, h, bits=bits, group_size=group_size, symmetric=symmetric, damp=damp,
                          block_size=block_size, act_order=act_order)
  qt = projection.pack(q, scales, None if symmetric else zeros, bits=bits, group_size=group_size,
                       shape=w.shape, n_in=1)
  baseline = rtn.quantize_matrix(w, bits=bits, group_size=group_size, symmetric=symmetric)
  return (qt, _relative_error(w, projection.dequantize(qt), h),
          _relative_error(w, projection.dequantize(baseline), h))


def _positions(x: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])


@functools.partial(jax.jit, static_argnames=("cfg", "name"))
def _input_hessian(cfg: ModelConfig, layer: Any, x: jax.Array, *, name: str) -> jax.Array:
  """2 X^T X summed over the batch's tokens, X the inputs of projection `name` of this block."""
  positions = _positions(x)
  rope = M.rotary_tables(positions, cfg)
  _, captured = M.Block(cfg).apply({"params": layer}, x, positions, rope, None,
                                   mutable=["projection_inputs"])
  module, n_in = M.PROJECTIONS[name]
  inputs = captured["projection_inputs"][module][name][0]  # (B, T, in...)
  inputs = inputs.reshape(-1, math.prod(inputs.shape[2:])).astype(jnp.float32)
  return 2.0 * jnp.einsum("MK,MJ->KJ", inputs, inputs, precision="highest")


@functools.partial(jax.jit, static_argnames="cfg")
def _block(cfg: ModelConfig, layer: Any, x: jax.Array) -> jax.Array:
  positions = _positions(x)
  rope = M.rotary_tables(positions, cfg)
  return M.Block(cfg).apply({"params": layer}, x, positions, rope, None)[0]


@functools.partial(jax.jit, static_argnames="cfg")
def _final_norm_hessian(cfg: ModelConfig, top: Any, x: jax.Array) -> jax.Array:
  normed = M.Transformer(cfg).apply({"params": top}, x, method=lambda m, x: m.norm(x))
  normed = normed.reshape(-1, normed.shape[-1]).astype(jnp.float32)
  return 2.0 * jnp.einsum("MK,MJ->KJ", normed, normed, precision="highest")


def _batches(x: jax.Array, size: int):
  for i in range(0, x.shape[0], size):
    yield x[i:i + size]


class _Solver:
  """GPTQ on one weight given its Hessian, with the report line; output channels over `mesh`."""

  def __init__(self, grid: Grid, options: Options, mesh: Mesh | None, report: list, log):
    self.grid, self.options, self.mesh, self.report, self.log = grid, options, mesh, report, log

  def __call__(self, w: jax.Array, h: jax.Array, n_in: int, where: str) -> projection.QuantizedTensor:
    shape = tuple(w.shape)
    k, o = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    size = self.grid.group_size_for(k, where)
    w2 = w.reshape(k, o).astype(jnp.float32)
    if self.mesh is not None and o % self.mesh.size == 0:
      w2 = jax.device_put(w2, NamedSharding(self.mesh, P(None, self.mesh.axis_names)))
      h = jax.device_put(h, NamedSharding(self.mesh, P()))
    qt, gptq_error, rtn_error = _solve(
        w2, h, bits=self.grid.bits, group_size=size, symmetric=self.grid.symmetric,
        damp=self.options.damp, block_size=self.options.block_size, act_order=self.options.act_order)
    errors = {"gptq": float(gptq_error), "rtn": float(rtn_error)}
    self.report.append({"weight": where, **errors})
    self.log(f"{where}: relative error gptq {errors['gptq']:.3e}, rtn {errors['rtn']:.3e}")
    return dataclasses.replace(qt, shape=shape, n_in=n_in)


def quantize_params(cfg: ModelConfig, params: Any, grid: Grid, options: Options = Options(),
                    calibration: np.ndarray | None = None, mesh: Mesh | None = None,
                    log: Callable[[str], None] = lambda _: None) -> tuple[Any, list[dict]]:
  """(parameters with every projection quantized, report) from a model's plain parameters;
  `calibration` (N, T) token windows for GPTQ. The report lists each GPTQ weight's relative
  reconstruction error against round-to-nearest's."""
  check_widths(cfg, grid, options.quantize_output)
  layers = params["layers"]["block"]
  if any(map(projection.is_structured, jax.tree.leaves(params, is_leaf=projection.is_structured))):
    raise ValueError("the model is already quantized (or carries adapters)")
  report: list[dict] = []
  if options.method == "rtn":
    new_layers = _map_projections(layers, lambda module, name, n_in, w: rtn.quantize_weight(
        w, grid, n_in, n_lead=1, name=f"{module}.{name}"))
    head = rtn.quantize_weight(params["output"], grid, 1, name="output") if options.quantize_output else None
    return _assemble(params, new_layers, head), report

  if calibration is None:
    raise ValueError("GPTQ needs calibration text (--calibration FILE)")
  cfg32 = cfg.replace(dtype="float32", param_dtype="float32", attention_impl="xla")
  top = {k: v for k, v in params.items() if k != "layers"}
  embed = jax.jit(lambda top, t: M.Transformer(cfg32).apply({"params": top}, t, method="embed"))
  x = jnp.concatenate([embed(top, jnp.asarray(t)) for t in _batches(np.asarray(calibration), options.batch_size)])
  solve = _Solver(grid, options, mesh, report, log)
  done = []
  for i in range(cfg.n_layers):
    layer = jax.tree.map(lambda a: a[i].astype(jnp.float32), layers)
    for group in M.SHARED_INPUTS:
      h = sum(_input_hessian(cfg32, layer, xb, name=group[0]) for xb in _batches(x, options.batch_size))
      h = h / (x.shape[0] * x.shape[1])
      for name in group:
        module, n_in = M.PROJECTIONS[name]
        layer[module][name] = solve(layer[module][name], h, n_in, f"layers.{i}.{module}.{name}")
    x = jnp.concatenate([_block(cfg32, layer, xb) for xb in _batches(x, options.batch_size)])
    done.append(layer)
  new_layers = _map_projections(layers, lambda module, name, n_in, w: jax.tree.map(
      lambda *per_layer: jnp.stack(per_layer), *[d[module][name] for d in done]))
  head = None
  if options.quantize_output:
    h = sum(_final_norm_hessian(cfg32, top, xb) for xb in _batches(x, options.batch_size))
    head = solve(params["output"], h / (x.shape[0] * x.shape[1]), 1, "output")
  return _assemble(params, new_layers, head), report


def _map_projections(layers: Any, fn) -> Any:
  """The stacked block parameters with fn(module, name, n_in, weight) in place of each projection."""
  out = {module: dict(sub) for module, sub in layers.items()}
  for name, (module, n_in) in M.PROJECTIONS.items():
    out[module][name] = fn(module, name, n_in, layers[module][name])
  return out


def _assemble(params: Any, layers: Any, head: Any) -> Any:
  out = {**params, "layers": {**params["layers"], "block": layers}}
  if head is not None:
    out["output"] = head
  return out
