"""Several hosts: JAX's own distributed runtime, started when the launcher says there are peers.

Explicit: JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=n JAX_PROCESS_ID=i python train.py ...
Clusters that JAX detects by itself (SLURM, Open MPI, Kubernetes, Cloud TPU) need no variables.
"""

from __future__ import annotations

import os

import jax

_CLUSTER_HINTS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def maybe_initialize() -> None:
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
