"""Bi-tuning: CE + CCE (classifier head) + CCL (projector head) against per-class key
queues filled by a momentum key encoder (Bi-tuning Eq. 5).

Order within a step: EMA update of the key encoder, keys of the second view, the CCL
against the queues as they were before this batch, the CCE against the queue AFTER
this batch's keys were enqueued (as the reference implementation;
`config.bituning.cce_after_enqueue=False`: before, like the CCL), then enqueue.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
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


def build_model(config, num_classes):
  return common.build_network(config, num_classes, projector=True,
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


def init_state(rng, sample_images, *, model, tx, config):
  rng, init_rng, queue_rng_h, queue_rng_z = jax.random.split(rng, 4)
  params, batch_stats = common.init_variables(model, init_rng, sample_images)
  num_classes = model.num_classes
  feat = params["head"]["dense"]["kernel"].shape[0]
  padded = queue_classes(num_classes, config)
  extras = {
      "queue_h": _padded_queues(queue_rng_h, num_classes, padded,
                                config.bituning.queue_size, feat + 1),
      "queue_z": _padded_queues(queue_rng_z, num_classes, padded,
                                config.bituning.queue_size, config.bituning.projector_dim),
  }
  # The key encoder starts as a copy of the query encoder.
  return common.new_state(rng, params, batch_stats, tx, key_encoder=True, extras=extras)


def state_shardings(abstract_state, mesh, config):
  """Replicated, except the queues' class axis when `config.shard_queues`."""
  rep = sharding.replicated(mesh)
  shardings = jax.tree.map(lambda _: rep, abstract_state)
  extras = {}
  for name, q in abstract_state.extras.items():
    keys = sharding.queue_sharding(mesh, q.keys.shape, shard=config.shard_queues)
    ptr = NamedSharding(mesh, P(*keys.spec[:1]))  # pointers follow the class axis
    extras[name] = queues.ClassQueues(keys=keys, ptr=ptr)
  return shardings.replace(extras=extras)


def train_step(state, batch, *, model, tx, cfg):
  """`batch`: image_q, image_k [B, H, W, 3] (two views), label [B]."""
  labels = batch["label"]
  key_params = ema.ema_update(state.key_params, state.params,
                              momentum=cfg.momentum(state.step))
  key_out, key_batch_stats = common.forward(model, key_params, state.key_batch_stats,
                                            batch["image_k"], train=True)
  h_k = jax.lax.stop_gradient(losses.append_one_and_normalize(key_out["features"]))
  z_k = jax.lax.stop_gradient(losses.l2_normalize(key_out["projection"]))
  queue_h = queues.enqueue_by_class(state.extras["queue_h"], keys=h_k, labels=labels)
  queue_z = state.extras["queue_z"]
  cce_queue = queue_h if cfg.cce_after_enqueue else state.extras["queue_h"]

  def loss_fn(params):
    out, batch_stats = common.forward(model, params, state.batch_stats, batch["image_q"],
                                      train=True)
    ce = common.ce_loss(out, labels)
    cce = losses.contrastive_cross_entropy_loss(
        h_query=out["features"], head_kernel=params["head"]["dense"]["kernel"],
        head_bias=params["head"]["dense"]["bias"], queue_h=cce_queue.keys,
        labels=labels, temperature=cfg.temperature)  # Eq. (3)
    ccl = losses.categorical_contrastive_loss(
        z_query=losses.l2_normalize(out["projection"]), z_key=z_k, queue_z=queue_z.keys,
        labels=labels, temperature=cfg.temperature,
        num_valid_classes=model.num_classes)  # Eq. (4)
    loss = ce + cfg.trade_off * (cce + ccl)  # Eq. (5)
    metrics = {"ce": ce, "cce": cce, "ccl": ccl,
               "train_accuracy": common.accuracy(out["logits"], labels)}
    return loss, (batch_stats, metrics)

  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  params, opt_state = common.apply_gradients(state, grads, tx)
  queue_z = queues.enqueue_by_class(queue_z, keys=z_k, labels=labels)
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state, key_params=key_params,
                        key_batch_stats=key_batch_stats,
                        extras={"queue_h": queue_h, "queue_z": queue_z})
  return state, dict(metrics, loss=loss)


def make_train_step(model, tx, config):
  cfg = StepConfig(
      temperature=config.bituning.temperature, trade_off=config.bituning.trade_off,
      cce_after_enqueue=config.bituning.cce_after_enqueue,
      momentum=ema.momentum_schedule(
          config.bituning.ema_momentum,
          total_steps=config.total_steps if config.bituning.ema_cosine else None))
  return functools.partial(train_step, model=model, tx=tx, cfg=cfg)
