"""A LoRA run on disk: DIR/lora.json beside the workdir's checkpoints, whose `params` are adapters.

lora.json holds the adapters' settings (`LoraConfig`), the base model they were trained on (the
run's `init_from`, as an absolute path) and the base's `fingerprint`, so that loading or merging
the adapters onto another model (another shape, or the same shape with other weights) is an error
naming both, not a silently wrong model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from llama_jax import checkpoint, projection, sharding
from llama_jax.config import ModelConfig
from llama_jax.lora import adapters as adapters_lib
from llama_jax.lora.config import LoraConfig


def write_info(workdir: str, lora: LoraConfig, base_path: str, base_fingerprint: str) -> None:
  """lora.json, written whole, and only where it changed (a resumed run rewrites nothing)."""
  info = {**lora.to_dict(), "base": os.path.abspath(base_path) if base_path else "",
          "base_fingerprint": base_fingerprint}
  text, path = json.dumps(info, indent=2), os.path.join(workdir, checkpoint.LORA)
  if os.path.isfile(path):
    with open(path) as f:
      if f.read() == text:
        return
  checkpoint.write_atomic(path, text)


def read_info(workdir: str) -> tuple[LoraConfig, dict]:
  """(settings, the whole lora.json) of a LoRA run's workdir (or of one of its step directories)."""
  path = os.path.join(workdir, checkpoint.LORA)
  if not os.path.isfile(path):
    path = os.path.join(checkpoint.find_params_dir(workdir)[1], checkpoint.LORA)
  try:
    with open(path) as f:
      info = json.load(f)
  except json.JSONDecodeError as e:
    raise checkpoint.CheckpointError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
  fields = ("rank", "alpha", "dropout", "target_modules", "quantize_base")
  return LoraConfig.from_dict({k: info[k] for k in fields if k in info}), info


def base_path(workdir: str) -> str:
  """The base model a LoRA run trained on (its init_from)."""
  _, info = read_info(workdir)
  if not info.get("base"):
    raise ValueError(f"{workdir}: the adapters' base model was a random initialisation (the run had "
                     "no init_from), which the workdir does not hold: merge them into a saved base with "
                     "`python -m llama_jax.convert --input RUN --merge_lora --base BASE --output DIR`")
  return info["base"]


def base_quantization(lora: LoraConfig, cfg: ModelConfig, base: str = "") -> dict | None:
  """The frozen base's quantized weights, described as quantization.json describes them: the base
  checkpoint's own where it is quantized, else those `lora.quantize_base` asks for (int8 per output
  channel; int4 in groups of 128 inputs, or 64 or 32 where 128 does not divide a width)."""
  if base and checkpoint.is_own_checkpoint(base):
    quantization = checkpoint.read_quantization(checkpoint.find_params_dir(base)[1])
    if quantization:
      return quantization["weights"]
  if not lora.quantize_base:
    return None
  from llama_jax import model as M
  shapes = M.param_shapes(cfg)["layers"]["block"]
  out = {}
  for name, (module, n_in) in M.PROJECTIONS.items():
    shape = tuple(shapes[module][name].value.shape[1:])
    width = math.prod(shape[:n_in])
    if lora.quantize_base == "int8":
      bits, size = 8, width
    else:
      bits, size = 4, next((g for g in (128, 64, 32) if width % g == 0), width)
    out[f"layers/block/{module}/{name}"] = {"bits": bits, "group_size": size, "shape": list(shape),
                                            "n_in": n_in, "symmetric": True}
  return out


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
  """tree[path[0]][path[1]]..., or None where a key is missing."""
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      return None
    tree = tree[k]
  return tree


def prepare_base(params: Any, description: dict | None) -> Any:
  """The frozen base as the adapters see it: every weight that `description` names quantized by
  round-to-nearest on its grid, unless it is quantized already (a quantized checkpoint). A weight
  the recipe's model does not have (a quantized output head, under a reward model) is skipped."""
  from llama_jax.quantize import rtn
  from llama_jax.quantize.grid import Grid
  for name, d in (description or {}).items():
    path = tuple(name.split("/"))
    w = _lookup(params, path)
    if w is None or projection.is_quantized(w):
      continue
    grid = Grid(int(d["bits"]), int(d["group_size"]), bool(d["symmetric"]))
    qt = rtn.quantize_weight(w, grid, int(d["n_in"]), n_lead=w.ndim - len(d["shape"]), name=name)
    params = projection.replace_at(params, path, qt)
  return params


def abstract_adapters(cfg: ModelConfig, lora: LoraConfig) -> Any:
  """The adapters' tree as boxed ShapeDtypeStructs (shapes and logical axes)."""
  return jax.eval_shape(lambda: adapters_lib.init_adapters(cfg, lora, jax.random.key(0)))


def restore_adapters(workdir: str, cfg: ModelConfig, lora: LoraConfig, mesh=None,
                     rules=sharding.DEFAULT_RULES) -> Any:
  """The adapters of the workdir's latest step (or of the step directory given); a recipe's heads
  saved beside them (a reward model's score) are left out."""
  params_dir, _ = checkpoint.find_params_dir(workdir)
  boxed = abstract_adapters(cfg, lora)
  shapes = nn.unbox(boxed)
  if mesh is not None:
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  return checkpoint.restore_tree(params_dir, target, partial=True)


def adapt(workdir: str, base_cfg: ModelConfig, base_params: Any, base_where: str, merge: bool | None = None,
          mesh=None, rules=sharding.DEFAULT_RULES) -> tuple[ModelConfig, Any, LoraConfig]:
  """(config, parameters, LoRA settings) of the workdir's adapters on the base model: merged into
  its weights, or attached beside them (`merge=None`: attached where the base is quantized, whose
  merge would leave int4/int8 for float). Another base than the run's is an error."""
  lora, info = read_info(workdir)
  cfg = checkpoint.read_model_config(checkpoint.find_params_dir(workdir)[1])
  for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size"):
    if getattr(cfg, name) != getattr(base_cfg, name):
      raise ValueError(f"{workdir}: the adapters fit a model with {name} {getattr(cfg, name)}, but "
                       f"{base_where} has {getattr(base_cfg, name)}")
  base_params = prepare_base(base_params, base_quantization(lora, cfg))
  adapters = restore_adapters(workdir, cfg, lora, mesh, rules)
  adapters_lib.check_shapes(base_params, adapters, base_where)
  found = adapters_lib.fingerprint(base_params)
  if info.get("base_fingerprint") and found != info["base_fingerprint"]:
    raise ValueError(f"{workdir}: the adapters were trained on a base with hash "
                     f"{info['base_fingerprint']} ({info.get('base') or 'a random initialisation'}), "
                     f"but {base_where} has hash {found}: another model")
  quantized = any(map(projection.is_quantized, jax.tree.leaves(base_params, is_leaf=projection.is_quantized)))
  if merge is None:
    merge = not quantized
  if merge:
    return base_cfg, adapters_lib.merge(base_params, adapters, lora), lora
  return base_cfg, adapters_lib.attach(base_params, adapters, lora), lora
