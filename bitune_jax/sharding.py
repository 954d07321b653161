"""Mesh and shardings: one data axis over all devices (pjit style).

* the batch is sharded over `data`;
* parameters, optimizer state and BatchNorm statistics are replicated;
* per-class queues `[C, K, D]` are sharded over their class axis when asked and C is a
  multiple of the device count (else replicated, and said so);
* multi-host: `jax.distributed.initialize()` before anything touches the devices, each
  host feeds its own slice of the global batch (`global_batch`).
"""

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger("bitune_jax")

DATA = "data"


def initialize_multihost(enabled: bool, coordinator_address: str | None = None,
                         num_processes: int | None = None,
                         process_id: int | None = None) -> None:
  """`jax.distributed.initialize()` before anything touches the devices.

  With `coordinator_address` (and `num_processes`, `process_id`) the processes are the
  ones named; with only `enabled` the cluster is detected (TPU pods, SLURM, ...). CPU
  processes exchange collectives over gloo, so that several processes also run on one
  machine (each with its own `--xla_force_host_platform_device_count`).
  """
  given = (coordinator_address, num_processes, process_id)
  if not enabled and all(v is None for v in given):
    return
  if coordinator_address is not None and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id")
  if num_processes is not None and process_id is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  log.info("multi-host: process %d of %d, %d local devices of %d", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(devices=None):
  """A 1-D mesh with axis `data` over `devices` (default: all devices)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA,))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim):
  """Leading (batch) axis over `data`, the rest whole."""
  return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def queue_sharding(mesh, shape, *, shard):
  """Class axis of a `[C, ...]` queue over `data` when `shard` and C divides evenly."""
  if shard and shape[0] % mesh.size == 0:
    return NamedSharding(mesh, P(DATA, *([None] * (len(shape) - 1))))
  if shard:
    log.warning("queues replicated: %d classes do not divide over %d devices",
                    shape[0], mesh.size)
  return replicated(mesh)


def check_batch_size(batch_size, mesh):
  if batch_size % mesh.size:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the device count "
                     f"({mesh.size}) so that the batch shards evenly")


def global_batch(local_batch, mesh):
  """Process-local numpy batch (this host's rows) -> global arrays sharded on `data`."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x),
      local_batch)


def put_same_on_every_process(tree, shardings):
  """`jax.device_put(tree, shardings)` for values that every process holds alike (read
  from one checkpoint file, computed from gathered data): each process puts only the
  pieces of its own devices.

  With several processes, `jax.device_put` of a host value first checks that it is the
  same on every process by gathering the whole value from each (`assert_equal`): a
  ResNet-50's weights, 100 MB, gathered from every host to every host, one collective
  per leaf. Callers that need the check make it on something small (the checkpoint's
  sha256, `training.state.with_pretrained`). On one process this is `jax.device_put`.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, sharding):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)  # already global: a reshard, if any
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(put, tree, shardings)
