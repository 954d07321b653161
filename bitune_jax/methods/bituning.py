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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bitune_jax import ema, losses, queues, sharding
from bitune_jax.methods import base, common


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
  memory_bank: bool = False  # the keys from memory banks, not a key encoder


def terms(config):
  """The loss terms of weight > 0, of ("ce", "cce", "ccl")."""
  b = config.bituning
  return tuple(name for name in ("ce", "cce", "ccl") if b[f"{name}_weight"] > 0)


def memory_bank(config):
  return config.bituning.key_generation == "memory_bank"


def validate(config):
  b = config.bituning
  if not any(b[f"{t}_weight"] > 0 for t in ("ce", "cce", "ccl")):
    raise ValueError("bituning.ce_weight, cce_weight and ccl_weight are all 0: nothing "
                     "to train")
  if b.key_generation not in ("momentum", "memory_bank"):
    raise ValueError(f"bituning.key_generation must be 'momentum' or 'memory_bank', got "
                     f"{b.key_generation!r}")
  if b.queue_size < 1:
    raise ValueError(f"bituning.queue_size (K) must be >= 1, got {b.queue_size}")


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


def init_extras(keys, params, batch_stats, *, model, config, data):
  """The queues (or memory banks: one row per example of the training pool, the
  batches' `index`) of the terms in use."""
  del batch_stats
  rng_h, rng_z = keys
  num_classes = model.num_classes
  feat = params["head"]["dense"]["kernel"].shape[0]
  padded = queue_classes(num_classes, config)
  used, extras = terms(config), {}
  if memory_bank(config):
    return _init_banks(rng_h, rng_z, np.asarray(data.pool.labels), padded, feat,
                       config, used)
  if "cce" in used:
    extras["queue_h"] = _padded_queues(rng_h, num_classes, padded,
                                       config.bituning.queue_size, feat + 1)
  if "ccl" in used:
    extras["queue_z"] = _padded_queues(rng_z, num_classes, padded,
                                       config.bituning.queue_size,
                                       config.bituning.projector_dim)
  return extras


def key_encoder(config):
  """A momentum key encoder, for the contrastive terms' keys (not with memory banks)."""
  return not memory_bank(config) and bool({"cce", "ccl"} & set(terms(config)))


def extras_shardings(abstract_extras, mesh, config):
  """Replicated, except the queues' class axis when `config.shard_queues` (and the
  memory banks' rows)."""
  rep = sharding.replicated(mesh)
  extras = {}
  for name, q in abstract_extras.items():
    if isinstance(q, queues.ClassQueues):
      keys = sharding.queue_sharding(mesh, q.keys.shape, shard=config.shard_queues)
      ptr = NamedSharding(mesh, P(*keys.spec[:1]))  # pointers follow the class axis
      extras[name] = queues.ClassQueues(keys=keys, ptr=ptr)
    elif isinstance(q, queues.MemoryBank):  # rows over the devices
      extras[name] = queues.MemoryBank(keys=sharding.queue_sharding(
          mesh, q.keys.shape, shard=config.shard_queues))
    else:
      extras[name] = jax.tree.map(lambda _: rep, q)
  return extras


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


def before(state, batch, *, model, cfg):
  """The keys the losses compare with (`context`): momentum keys of the second view
  (the key encoder moved by EMA first; `queue_h` takes this batch's keys ahead of the
  CCE when `cce_after_enqueue`), or keys drawn from the memory banks."""
  if cfg.memory_bank:
    return state, _bank_keys(state, batch, cfg)
  labels = batch["label"]
  use_cce, use_ccl = cfg.cce_weight > 0, cfg.ccl_weight > 0
  context = {"queue_h": None, "z_key": None, "queue_z": None}
  if not (use_cce or use_ccl):
    return state, context
  key_params = ema.ema_update(state.key_params, state.params,
                              momentum=cfg.momentum(state.step))
  key_out, key_batch_stats = common.forward(model, key_params, state.key_batch_stats,
                                            batch["image_k"], train=True)
  extras = dict(state.extras)
  if use_cce:
    h_k = jax.lax.stop_gradient(losses.append_one_and_normalize(key_out["features"]))
    extras["queue_h"] = queues.enqueue_by_class(state.extras["queue_h"], keys=h_k,
                                                labels=labels)
    context["queue_h"] = (extras["queue_h"] if cfg.cce_after_enqueue
                          else state.extras["queue_h"]).keys
  if use_ccl:
    context["z_key"] = jax.lax.stop_gradient(
        losses.l2_normalize(key_out["projection"]))
    context["queue_z"] = state.extras["queue_z"].keys
  return state.replace(key_params=key_params, key_batch_stats=key_batch_stats,
                       extras=extras), context


def _bank_keys(state, batch, cfg):
  """K keys per class drawn from the banks' snapshots (with replacement), and each
  example's own snapshot as its CCL positive."""
  extras = state.extras
  table, counts = extras["bank_table"], extras["bank_counts"]
  rng_h, rng_z = jax.random.split(jax.random.fold_in(state.rng, state.step))
  context = {"queue_h": None, "z_key": None, "queue_z": None}
  if cfg.cce_weight > 0:
    context["queue_h"] = queues.sample_class_keys(
        extras["bank_h"].keys, table=table, counts=counts, rng=rng_h,
        size=cfg.queue_size)  # [C', K, F+1]
  if cfg.ccl_weight > 0:
    context["queue_z"] = queues.sample_class_keys(
        extras["bank_z"].keys, table=table, counts=counts, rng=rng_z,
        size=cfg.queue_size)  # [C', K, D]
    context["z_key"] = jnp.take(extras["bank_z"].keys, batch["index"], axis=0)
  return context


def loss(params, state, batch, context, *, model, cfg):
  """Eq. (5) on the first view. `batch`: image_q (and image_k: the key encoder's
  view) [B, H, W, 3], label [B] (and index [B], each example's bank row)."""
  out, batch_stats = common.forward(model, params, state.batch_stats, batch["image_q"],
                                    train=True, rng=common.dropout_rng(state))
  total, metrics = _loss(params, out, batch["label"], cfg=cfg,
                         num_classes=model.num_classes, **context)
  return total, (batch_stats, metrics, out)


def after(state, batch, context, out, *, cfg):
  """Enqueues the CCL's keys (after the loss), or moves the banks' rows of this batch
  towards the query's own (Eqs. 7-8)."""
  extras = dict(state.extras)
  if cfg.memory_bank:
    if cfg.cce_weight > 0:  # Eq. (8)
      h_q = jax.lax.stop_gradient(losses.append_one_and_normalize(out["features"]))
      extras["bank_h"] = queues.update_memory_bank(
          extras["bank_h"], indices=batch["index"], values=h_q,
          momentum=cfg.bank_momentum)
    if cfg.ccl_weight > 0:  # Eq. (7)
      z_q = jax.lax.stop_gradient(losses.l2_normalize(out["projection"]))
      extras["bank_z"] = queues.update_memory_bank(
          extras["bank_z"], indices=batch["index"], values=z_q,
          momentum=cfg.bank_momentum)
  elif cfg.ccl_weight > 0:
    extras["queue_z"] = queues.enqueue_by_class(extras["queue_z"], keys=context["z_key"],
                                                labels=batch["label"])
  return state.replace(extras=extras)


def step_config(config):
  b = config.bituning
  return StepConfig(
      temperature=b.temperature, trade_off=b.trade_off,
      cce_after_enqueue=b.cce_after_enqueue, ce_weight=b.ce_weight,
      cce_weight=b.cce_weight, ccl_weight=b.ccl_weight, queue_size=b.queue_size,
      bank_momentum=b.bank_momentum,
      memory_bank=memory_bank(config),
      momentum=ema.momentum_schedule(
          b.ema_momentum, total_steps=config.total_steps if b.ema_cosine else None))


METHOD = base.Method(
    name="bituning", sections=("bituning",), views="two",
    rules={"bituning.temperature": base.POSITIVE,
           "bituning.trade_off": base.NON_NEGATIVE,
           "bituning.ce_weight": base.NON_NEGATIVE,
           "bituning.cce_weight": base.NON_NEGATIVE,
           "bituning.ccl_weight": base.NON_NEGATIVE,
           "bituning.ema_momentum": base.EMA, "bituning.bank_momentum": base.EMA},
    legacy={"bituning.ce_weight": 1.0, "bituning.cce_weight": 1.0,
            "bituning.ccl_weight": 1.0, "bituning.key_generation": "momentum",
            "bituning.bank_momentum": 0.5},
    validate=validate, build_model=build_model, extra_keys=2,
    init_extras=init_extras, key_encoder=key_encoder,
    extras_shardings=extras_shardings, step_config=step_config, before=before,
    loss=loss, after=after)
