"""Bi-tuning: CE + CCE (classifier head) + CCL (projector head) against per-class key
queues filled by a momentum key encoder (Bi-tuning Eq. 5).

Order within a step: EMA update of the key encoder, keys of the second view, the CCL
against the queues as they were before this batch, the CCE against the queue AFTER
this batch's keys were enqueued (as the reference implementation;
`config.bituning.cce_after_enqueue=False`: before, like the CCL), then enqueue.

The loss is `ce_weight * CE + trade_off * (cce_weight * CCE + ccl_weight * CCL)`
(`config.bituning.*`; all 1 by default, Eq. 5). A term of weight 0 is not computed and
what only it needs is not built (the loss ablations of Bi-tuning Table 5): without
the CCE, no `queue_h`; without the CCL, no projector, no `queue_z`; without both, no
key encoder.

With `config.bituning.key_generation = "memory_bank"` (Appendix B.2) there is no key
encoder and no queue: every training example has a snapshot of its `normalize([h, 1])`
and `normalize(z)` (`bank_h [N, F+1]`, `bank_z [N, D]`, sharded over the devices along
N), updated after each step from the query's own with momentum m (Eqs. 7-8,
`bank_momentum`, 0.5 after Wu et al.; renormalised). The CCE and the CCL draw their
K keys per class uniformly (with replacement) from the snapshots of that class's
examples, before this batch's update; the CCL's positive key of an example is its own
snapshot. One view per example is used.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bitune_jax import ema, losses, queues, sharding
from bitune_jax.methods import common

TWO_VIEWS = True


@dataclasses.dataclass(frozen=True)
class StepConfig:
  temperature: float
  trade_off: float
  cce_after_enqueue: bool
  momentum: Callable  # step -> key-encoder momentum
  ce_weight: float = 1.0
  cce_weight: float = 1.0
  ccl_weight: float = 1.0
  queue_size: int = 0  # K, drawn per class from a memory bank
  bank_momentum: float = 0.5


def terms(config):
  """The loss terms of weight > 0, of ("ce", "cce", "ccl")."""
  b = config.bituning
  return tuple(name for name in ("ce", "cce", "ccl")
               if b.get(f"{name}_weight", 1.0) > 0)


def memory_bank(config):
  return config.bituning.get("key_generation", "momentum") == "memory_bank"


def init_data(config, data):
  """What `init_state` needs from the data: a memory bank's labels (its rows are the
  training pool's rows, the batches' `index`)."""
  return {"train_labels": np.asarray(data.pool.labels)} if memory_bank(config) else {}


def build_model(config, num_classes):
  projector_dim = config.bituning.projector_dim if "ccl" in terms(config) else None
  return common.build_network(config, num_classes, projector_dim=projector_dim,
                              reference_init="normal_0.01")


def queue_classes(num_classes, config):
  """Rows of the per-class queues: C, padded to a multiple of the device count when the
  queues are sharded over classes (the padding rows take no part in the losses)."""
  devices = jax.device_count() if config.shard_queues else 1
  return -(-num_classes // devices) * devices


def _padded_queues(rng, num_classes, padded, size, dim):
  """The real classes' queues do not depend on the padding (same numbers on any mesh)."""
  q = queues.init_class_queues(rng, num_classes=num_classes, size=size, dim=dim)
  extra = padded - num_classes
  return queues.ClassQueues(keys=jnp.pad(q.keys, ((0, extra), (0, 0), (0, 0))),
                            ptr=jnp.pad(q.ptr, (0, extra)))


def _init_banks(rng_h, rng_z, train_labels, padded, feat, config, used):
  """The memory banks (random unit keys, as Wu et al.), one row per training example
  padded to a multiple of the device count, and where each class's rows are. The real
  rows do not depend on the padding (the same numbers on any mesh)."""
  devices = jax.device_count() if config.shard_queues else 1
  labels = np.asarray(train_labels, np.int32)
  count = len(labels)
  extra = -(-count // devices) * devices - count
  labels = np.pad(labels, (0, extra), constant_values=-1)  # padding rows: never drawn
  table, counts = queues.class_index_table(labels, num_rows=padded)
  extras = {"bank_table": jnp.asarray(table), "bank_counts": jnp.asarray(counts)}

  def bank(rng, dim):
    keys = queues.init_memory_bank(rng, size=count, dim=dim).keys
    return queues.MemoryBank(keys=jnp.pad(keys, ((0, extra), (0, 0))))
  if "cce" in used:
    extras["bank_h"] = bank(rng_h, feat + 1)
  if "ccl" in used:
    extras["bank_z"] = bank(rng_z, config.bituning.projector_dim)
  return extras


def init_state(rng, sample_images, *, model, tx, config, train_labels=None):
  """`train_labels`: the training pool's labels, for a memory bank (`init_data`)."""
  rng, init_rng, queue_rng_h, queue_rng_z = jax.random.split(rng, 4)
  params, batch_stats = common.init_variables(model, init_rng, sample_images)
  num_classes = model.num_classes
  feat = params["head"]["dense"]["kernel"].shape[0]
  padded = queue_classes(num_classes, config)
  used, extras = terms(config), {}
  if memory_bank(config):
    if train_labels is None:
      raise ValueError("bituning.key_generation='memory_bank' needs the training labels")
    extras = _init_banks(queue_rng_h, queue_rng_z, train_labels, padded, feat, config,
                         used)
    return common.new_state(rng, params, batch_stats, tx, key_encoder=False,
                            extras=extras)
  if "cce" in used:
    extras["queue_h"] = _padded_queues(queue_rng_h, num_classes, padded,
                                       config.bituning.queue_size, feat + 1)
  if "ccl" in used:
    extras["queue_z"] = _padded_queues(queue_rng_z, num_classes, padded,
                                       config.bituning.queue_size,
                                       config.bituning.projector_dim)
  # The key encoder starts as a copy of the query encoder.
  return common.new_state(rng, params, batch_stats, tx, key_encoder=bool(extras),
                          extras=extras)


def state_shardings(abstract_state, mesh, config):
  """Replicated, except the queues' class axis when `config.shard_queues`."""
  rep = sharding.replicated(mesh)
  shardings = jax.tree.map(lambda _: rep, abstract_state)
  extras = dict(shardings.extras)
  for name, q in abstract_state.extras.items():
    if isinstance(q, queues.ClassQueues):
      keys = sharding.queue_sharding(mesh, q.keys.shape, shard=config.shard_queues)
      ptr = NamedSharding(mesh, P(*keys.spec[:1]))  # pointers follow the class axis
      extras[name] = queues.ClassQueues(keys=keys, ptr=ptr)
    elif isinstance(q, queues.MemoryBank):  # rows over the devices
      extras[name] = queues.MemoryBank(keys=sharding.queue_sharding(
          mesh, q.keys.shape, shard=config.shard_queues))
  return shardings.replace(extras=extras)


def _loss(params, out, labels, *, cfg, num_classes, queue_h, z_key, queue_z):
  """`(loss, metrics)`: the weighted CE, CCE against `queue_h [C', K, F+1]` and CCL of
  `z_key [B, D]` against `queue_z [C', K, D]` (the terms of weight > 0), Eq. (5)."""
  metrics = {"train_accuracy": common.accuracy(out["logits"], labels)}
  loss = 0.0
  if cfg.ce_weight > 0:
    metrics["ce"] = common.ce_loss(out, labels)
    loss += cfg.ce_weight * metrics["ce"]
  if cfg.cce_weight > 0:
    metrics["cce"] = losses.contrastive_cross_entropy_loss(
        h_query=out["features"], head_kernel=params["head"]["dense"]["kernel"],
        head_bias=params["head"]["dense"]["bias"], queue_h=queue_h,
        labels=labels, temperature=cfg.temperature)  # Eq. (3)
    loss += cfg.trade_off * cfg.cce_weight * metrics["cce"]
  if cfg.ccl_weight > 0:
    metrics["ccl"] = losses.categorical_contrastive_loss(
        z_query=losses.l2_normalize(out["projection"]), z_key=z_key, queue_z=queue_z,
        labels=labels, temperature=cfg.temperature,
        num_valid_classes=num_classes)  # Eq. (4)
    loss += cfg.trade_off * cfg.ccl_weight * metrics["ccl"]
  return loss, metrics


def train_step(state, batch, *, model, tx, cfg):
  """`batch`: image_q, image_k [B, H, W, 3] (two views), label [B]."""
  labels = batch["label"]
  extras = dict(state.extras)
  key_params, key_batch_stats = state.key_params, state.key_batch_stats
  use_cce, use_ccl = cfg.cce_weight > 0, cfg.ccl_weight > 0
  z_k = None
  if use_cce or use_ccl:
    key_params = ema.ema_update(state.key_params, state.params,
                                momentum=cfg.momentum(state.step))
    key_out, key_batch_stats = common.forward(model, key_params, state.key_batch_stats,
                                              batch["image_k"], train=True)
  if use_cce:
    h_k = jax.lax.stop_gradient(losses.append_one_and_normalize(key_out["features"]))
    extras["queue_h"] = queues.enqueue_by_class(state.extras["queue_h"], keys=h_k,
                                                labels=labels)
    cce_queue = extras["queue_h"] if cfg.cce_after_enqueue else state.extras["queue_h"]
  if use_ccl:
    z_k = jax.lax.stop_gradient(losses.l2_normalize(key_out["projection"]))

  def loss_fn(params):
    out, batch_stats = common.forward(model, params, state.batch_stats, batch["image_q"],
                                      train=True)
    loss, metrics = _loss(params, out, labels, cfg=cfg, num_classes=model.num_classes,
                          queue_h=cce_queue.keys if use_cce else None, z_key=z_k,
                          queue_z=state.extras["queue_z"].keys if use_ccl else None)
    return loss, (batch_stats, metrics)

  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  params, opt_state = common.apply_gradients(state, grads, tx)
  if use_ccl:
    extras["queue_z"] = queues.enqueue_by_class(state.extras["queue_z"], keys=z_k,
                                                labels=labels)
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state, key_params=key_params,
                        key_batch_stats=key_batch_stats, extras=extras)
  return state, dict(metrics, loss=loss)


def bank_train_step(state, batch, *, model, tx, cfg):
  """The memory-bank variant (see the module docstring). `batch`: image_q [B, H, W, 3],
  label [B], index [B] (each example's bank row)."""
  labels, index = batch["label"], batch["index"]
  extras = dict(state.extras)
  table, counts = extras["bank_table"], extras["bank_counts"]
  rng_h, rng_z = jax.random.split(jax.random.fold_in(state.rng, state.step))
  use_cce, use_ccl = cfg.cce_weight > 0, cfg.ccl_weight > 0
  queue_h = queue_z = z_key = None
  if use_cce:
    queue_h = queues.sample_class_keys(extras["bank_h"].keys, table=table, counts=counts,
                                       rng=rng_h, size=cfg.queue_size)  # [C', K, F+1]
  if use_ccl:
    queue_z = queues.sample_class_keys(extras["bank_z"].keys, table=table, counts=counts,
                                       rng=rng_z, size=cfg.queue_size)  # [C', K, D]
    z_key = jnp.take(extras["bank_z"].keys, index, axis=0)  # [B, D] own snapshots

  def loss_fn(params):
    out, batch_stats = common.forward(model, params, state.batch_stats, batch["image_q"],
                                      train=True)
    loss, metrics = _loss(params, out, labels, cfg=cfg, num_classes=model.num_classes,
                          queue_h=queue_h, z_key=z_key, queue_z=queue_z)
    return loss, (batch_stats, metrics, out)

  (loss, (batch_stats, metrics, out)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  params, opt_state = common.apply_gradients(state, grads, tx)
  if use_cce:  # Eq. (8)
    h_q = jax.lax.stop_gradient(losses.append_one_and_normalize(out["features"]))
    extras["bank_h"] = queues.update_memory_bank(
        extras["bank_h"], indices=index, values=h_q, momentum=cfg.bank_momentum)
  if use_ccl:  # Eq. (7)
    z_q = jax.lax.stop_gradient(losses.l2_normalize(out["projection"]))
    extras["bank_z"] = queues.update_memory_bank(
        extras["bank_z"], indices=index, values=z_q, momentum=cfg.bank_momentum)
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state, extras=extras)
  return state, dict(metrics, loss=loss)


def make_train_step(model, tx, config):
  cfg = StepConfig(
      temperature=config.bituning.temperature, trade_off=config.bituning.trade_off,
      cce_after_enqueue=config.bituning.cce_after_enqueue,
      ce_weight=config.bituning.get("ce_weight", 1.0),
      cce_weight=config.bituning.get("cce_weight", 1.0),
      ccl_weight=config.bituning.get("ccl_weight", 1.0),
      queue_size=config.bituning.queue_size,
      bank_momentum=config.bituning.get("bank_momentum", 0.5),
      momentum=ema.momentum_schedule(
          config.bituning.ema_momentum,
          total_steps=config.total_steps if config.bituning.ema_cosine else None))
  step = bank_train_step if memory_bank(config) else train_step
  return functools.partial(step, model=model, tx=tx, cfg=cfg)
