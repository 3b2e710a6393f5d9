"""The adapters: their own parameter tree, how it attaches to the model's and how it merges in.

For a projection W (in..., out...) the adapter is a (in..., r) and b (r, out...), stacked on the
layers axis like W; the model computes x W + (alpha / r) (dropout(x) a) b (Hu et al. 2021, eq. 3).
As in PEFT, a starts uniform in +-1/sqrt(fan_in) (`kaiming_uniform_(a=sqrt(5))`) and b at zero, so
a fresh adapter leaves the model's output unchanged.

The tree mirrors the model's paths: {"layers": {"block": {"attention": {"wq": {"a", "b"}}}}}.
`attach` puts `projection.LoraWeight`s in the parameter tree (no copy of anything; `model._project`
applies them); `merge` folds the adapters into plain weights (a quantized base is dequantized first).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from llama_jax import model as M
from llama_jax import projection
from llama_jax.config import ModelConfig
from llama_jax.lora.config import LoraConfig

ROOT = ("layers", "block")


def _weight_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """name -> (per-layer weight shape, its logical axes) for every projection."""
  shapes = M.param_shapes(cfg)["layers"]["block"]
  return {name: (tuple(shapes[module][name].value.shape[1:]), tuple(shapes[module][name].names[1:]))
          for name, (module, _) in M.PROJECTIONS.items()}


def init_adapters(cfg: ModelConfig, lora: LoraConfig, rng: jax.Array) -> Any:
  """Fresh adapters, boxed with their logical axes (a: the weight's inputs, b: its outputs), so
  that a jitted initialisation places them by the mesh rules."""
  out: dict = {}
  shapes = _weight_shapes(cfg)
  for i, name in enumerate(lora.target_modules):
    module, n_in = M.PROJECTIONS[name]
    shape, axes = shapes[name]
    fan_in = math.prod(shape[:n_in])
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(rng, i), (cfg.n_layers,) + shape[:n_in] + (lora.rank,),
                           jnp.float32, -bound, bound)
    b = jnp.zeros((cfg.n_layers, lora.rank) + shape[n_in:], jnp.float32)
    out.setdefault(module, {})[name] = {
        "a": nn.LogicallyPartitioned(a, (M.LAYERS,) + axes[:n_in] + (None,)),
        "b": nn.LogicallyPartitioned(b, (M.LAYERS, None) + axes[n_in:])}
  return {"layers": {"block": out}}


def count(adapters: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(adapters)))


def expected_count(cfg: ModelConfig, lora: LoraConfig) -> int:
  """r * (fan_in + fan_out) per adapted projection and layer."""
  shapes = _weight_shapes(cfg)
  total = 0
  for name in lora.target_modules:
    shape, _ = shapes[name]
    n_in = M.PROJECTIONS[name][1]
    total += lora.rank * (math.prod(shape[:n_in]) + math.prod(shape[n_in:]))
  return cfg.n_layers * total


def _targets(adapters: Any):
  for module, names in adapters["layers"]["block"].items():
    for name, ab in names.items():
      yield module, name, ab


def check_shapes(params: Any, adapters: Any, where: str = "the base model") -> None:
  """Adapters and base weights agree in shape, or one line says where they do not."""
  block = params["layers"]["block"]
  for module, name, ab in _targets(adapters):
    w = block.get(module, {}).get(name)
    if w is None:
      raise ValueError(f"{where} has no weight {module}.{name} for the adapters")
    shape = (tuple(w.values.shape[:-2]) + tuple(w.shape) if projection.is_quantized(w)
             else tuple(w.shape))
    n_in = M.PROJECTIONS[name][1]
    want = tuple(ab["a"].shape[:-1]) + tuple(ab["b"].shape[2:])
    if shape != want or len(ab["a"].shape) != 2 + n_in:
      raise ValueError(f"adapters of {module}.{name} fit a weight of shape {want}, but {where}'s is {shape}")


def _layer_keys(key: jax.Array | None, index: int, n_layers: int) -> jax.Array | None:
  if key is None:
    return None
  return jax.random.split(jax.random.fold_in(key, index), n_layers)


def attach(params: Any, adapters: Any, lora: LoraConfig, key: jax.Array | None = None) -> Any:
  """The parameter tree with each adapted weight as a LoraWeight(base, a, b). `key`: dropout on the
  adapters' input (training), one key per projection and layer; None: no dropout."""
  block = {module: dict(sub) for module, sub in params["layers"]["block"].items()}
  n_layers = jax.tree.leaves(params["layers"]["block"])[0].shape[0]
  dropout = lora.dropout if key is not None else 0.0
  for i, (module, name, ab) in enumerate(_targets(adapters)):
    block[module][name] = projection.LoraWeight(
        block[module][name], ab["a"], ab["b"], _layer_keys(key if dropout else None, i, n_layers),
        lora.scale, dropout)
  return {**params, "layers": {**params["layers"], "block": block}}


@jax.jit
def _merged(w: Any, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  base = projection.dequantize(w) if projection.is_quantized(w) else w.astype(jnp.float32)
  a2 = a.reshape(a.shape[0], -1, a.shape[-1]).astype(jnp.float32)  # (L, K, r)
  b2 = b.reshape(b.shape[0], b.shape[1], -1).astype(jnp.float32)  # (L, r, O)
  delta = jnp.einsum("LKR,LRO->LKO", a2, b2, precision="highest") * scale
  return base + delta.reshape(base.shape)


def merge(params: Any, adapters: Any, lora: LoraConfig, dtype=None) -> Any:
  """Plain parameters W + scale * a b (in float32, then `dtype`, default the base's float dtype).
  A quantized base weight is dequantized: the merged model is a float model."""
  check_shapes(params, adapters)
  block = {module: dict(sub) for module, sub in params["layers"]["block"].items()}
  for module, name, ab in _targets(adapters):
    w = block[module][name]
    want = dtype or (jnp.float32 if projection.is_quantized(w) else w.dtype)
    block[module][name] = _merged(w, ab["a"], ab["b"], lora.scale).astype(want)
  return {**params, "layers": {**params["layers"], "block": block}}


def _evenly_spaced(leaf: jax.Array, count: int) -> np.ndarray:
  """Up to `count` evenly spaced values of an array, picked on its devices and replicated before
  they come to the host (on several hosts, a slice of a sharded array spans other hosts' devices)."""
  stride = max(1, leaf.size // count)
  pick = lambda x: jnp.ravel(x)[::stride][:count]  # noqa: E731
  where = getattr(leaf, "sharding", None)
  if isinstance(where, jax.sharding.NamedSharding):
    replicated = jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec())
    return np.asarray(jax.jit(pick, out_shardings=replicated)(leaf))
  return np.asarray(jax.device_get(pick(leaf)))


def fingerprint(params: Any) -> str:
  """A hash of a model's blocks (`params["layers"]`, what every recipe's model shares: a reward
  model has no output head) that tells one base model from another: shapes, and up to 4096 values
  of every array, evenly spaced, rounded to bfloat16 (so a bfloat16 copy of a float32 base is the
  same base). The values are picked on the device; only they come to the host."""
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(params.get("layers", params))
  for path, leaf in leaves:
    sample = _evenly_spaced(leaf, 4096)
    if np.issubdtype(sample.dtype, np.floating) or sample.dtype == ml_dtypes.bfloat16:
      sample = sample.astype(np.float32).astype(ml_dtypes.bfloat16)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(str(tuple(leaf.shape)).encode())
    digest.update(sample.tobytes())
  return digest.hexdigest()[:16]
