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


def initialize_multihost(enabled):
  """`jax.distributed.initialize()` (cluster auto-detection on TPU pods / SLURM)."""
  if enabled:
    jax.distributed.initialize()
    log.info("multi-host: process %d of %d, %d local devices of %d",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


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


def local_slice(batch_size):
  """Rows `[start, stop)` of the global batch that this host reads."""
  per_host = batch_size // jax.process_count()
  start = jax.process_index() * per_host
  return start, start + per_host
