"""Devices: the mesh, the logical-axis rules that place parameters and activations on it, and
the multi-host runtime.

The model names its axes logically (`model.EMBED`, `model.HEADS`, ...); one small table maps each
name to mesh axes `data`, `fsdp` and `tensor`. Projections are split Megatron-style over `tensor`
(column-parallel wq/wk/wv/w1/w3, row-parallel wo/w2) and ZeRO-3-style over `fsdp` on the model
dimension; the batch is split over `data` and `fsdp` together.

Several hosts use JAX's own distributed runtime (`initialize_distributed`), started when the
launcher says there are peers: explicitly with
  JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=n JAX_PROCESS_ID=i python train.py ...
or by itself on clusters JAX detects (SLURM, Open MPI, Kubernetes, Cloud TPU).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None: replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("act_embed", None),
)


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the field."""


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 entry to all remaining devices; checks the product is the device count."""
  sizes = [int(data), int(fsdp), int(tensor)]
  if sizes.count(-1) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh: axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh: data={data} fsdp={fsdp} tensor={tensor} does not fit {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices "
        f"(data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]})")
  return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  try:  # a topology-aware layout (ICI/NVLink neighbours on the fast axes) where JAX knows one
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def as_rules(rules) -> tuple[tuple[str, Any], ...]:
  """The rules table as nested tuples (hashable: a static argument of jitted functions), from any
  sequence of pairs (a config's lists included)."""
  def axes(a):
    return tuple(a) if isinstance(a, (list, tuple)) else a

  def mesh_axes_ok(a) -> bool:
    return a is None or isinstance(a, str) or (isinstance(a, (list, tuple)) and all(isinstance(x, str) for x in a))

  try:
    pairs = [(name, a) for name, a in rules]
  except (TypeError, ValueError):
    pairs = None
  if pairs is None or not all(isinstance(name, str) and mesh_axes_ok(a) for name, a in pairs):
    raise ConfigError(f"mesh.rules must be (logical axis, mesh axes) pairs, as sharding.DEFAULT_RULES "
                      f"is; got {rules!r}")
  return tuple((name, axes(a)) for name, a in pairs)


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """A pytree of logical PartitionSpecs -> a pytree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(as_rules(rules)))


def param_shardings(model_cfg, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """Shardings of a model's parameters on `mesh`, from its shapes alone (no arrays are made)."""
  from llama_jax.model import param_shapes
  return logical_to_sharding(nn.get_partition_spec(param_shapes(model_cfg)), mesh, rules)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """(B, T) arrays: rows over the batch axes of the rules, sequence replicated."""
  return logical_to_sharding(P("batch", None), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=DEFAULT_RULES):
  """Makes the model's `with_logical_constraint` calls bind to this mesh while tracing (around a
  jitted call, or inside the traced function)."""
  with contextlib.ExitStack() as stack:
    try:
      stack.enter_context(jax.set_mesh(mesh))
    except ValueError:  # inside a jit trace, where only the abstract mesh may be set
      stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    stack.enter_context(nn.logical_axis_rules(list(as_rules(rules))))
    yield


def check_divisible(mesh: Mesh, global_batch: int, n_heads: int, n_kv_heads: int, rules=DEFAULT_RULES):
  """Clear errors for shapes that cannot split over the mesh."""
  batch_axes = dict(rules).get("batch") or ()
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  batch_devices = math.prod(mesh.shape[a] for a in batch_axes)
  if global_batch % batch_devices:
    raise ConfigError(
        f"batch_size {global_batch} does not divide over the {batch_devices} data-parallel devices "
        f"({' x '.join(f'{a}={mesh.shape[a]}' for a in batch_axes)})")
  tensor = mesh.shape["tensor"]
  if n_kv_heads % tensor or n_heads % tensor:
    raise ConfigError(
        f"mesh.tensor={tensor} must divide model.n_heads ({n_heads}) and model.n_kv_heads ({n_kv_heads})")


def check_params_divisible(model_cfg, mesh: Mesh, rules=DEFAULT_RULES) -> None:
  """A clear error for a parameter axis that the mesh axes its rule maps it to do not divide
  (model.vocab_size over mesh.tensor, model.dim over mesh.fsdp, ...): found before any array is
  made or restored, where JAX's would name neither the field nor the mesh axis."""
  from llama_jax.model import param_shapes
  # The shapes do not depend on the attention's kernel; cuDNN's cannot be traced off a GPU (the
  # checks run before anything, on any host).
  model_cfg = model_cfg.replace(attention_impl="xla")
  shapes = nn.unbox(param_shapes(model_cfg))
  specs = jax.tree.map(lambda s: s.spec, param_shardings(model_cfg, mesh, rules),
                       is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, shape), spec in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, P))):
    for size, axes in zip(shape.shape, spec):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      devices = math.prod(mesh.shape[a] for a in axes)
      if size % devices:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ConfigError(f"parameter {name} {tuple(shape.shape)}: its axis of {size} does not split over "
                          f"{' x '.join(f'mesh.{a}={mesh.shape[a]}' for a in axes)}; choose mesh axes that "
                          "divide the model's sizes (vocab_size, dim, hidden_dim, heads)")


_CLUSTER_HINTS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def initialize_distributed() -> None:
  """Starts JAX's distributed runtime when the environment names peers; a no-op otherwise."""
  if jax.distributed.is_initialized():
    return
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # Cross-process collectives on CPU devices go through gloo (tests; CPU-only clusters).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if address:
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif any(os.environ.get(k) for k in _CLUSTER_HINTS) and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
    jax.distributed.initialize()
