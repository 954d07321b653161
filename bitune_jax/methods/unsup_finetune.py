"""Unsupervised fine-tuning: MoCo v2 on unlabeled target data with sparse source replay
and CutMix-mixed queries (the unsupervised fine-tuning paper).

* MoCo v2: MLP projector (F -> F -> 128), momentum key encoder, FIFO queue of
  negatives, InfoNCE at temperature 0.2 (`losses.info_nce_loss`).
* Source replay: a fixed random fraction of a source dataset joins the target pool
  (`train.load_dataset`; `config.unsup.replay_fraction`, 10% by default).
* CutMix: each query is mixed with its neighbour in the batch (`data.cutmix`); the mixed
  query's loss is Eq. (6), `lam * InfoNCE(q_m, k_a) + (1 - lam) * InfoNCE(q_m, k_b)`
  (`losses.mixed_info_nce_loss`); unmixed queries keep plain InfoNCE.
* BatchNorm per group of `bn_group_size` examples (0: the whole batch), with the key
  batch shuffled across groups so that a key never shares statistics with its query.

Labels are never used in training; evaluation is on features (`FEATURE_EVAL`).
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from bitune_jax import ema, losses, models, queues
from bitune_jax.data import cutmix
from bitune_jax.methods import common

TWO_VIEWS = True
FEATURE_EVAL = True


@dataclasses.dataclass(frozen=True)
class StepConfig:
  temperature: float
  momentum: Callable
  use_cutmix: bool
  cutmix_alpha: float
  mixed_weight: float
  bn_group_size: int


def build_model(config, num_classes):
  width = models.num_features(config.arch)
  dtype = jnp.bfloat16 if config.get("bf16", False) else jnp.float32
  return common.Network(arch=config.arch, num_classes=num_classes,
                        projector_dim=config.unsup.projector_dim,
                        projector_hidden=width if config.unsup.mlp else None, dtype=dtype,
                        head_init=common.head_init(config))


def init_state(rng, sample_images, *, model, tx, config):
  rng, init_rng, queue_rng = jax.random.split(rng, 3)
  params, batch_stats = common.init_variables(model, init_rng, sample_images)
  queue = queues.init_fifo_queue(queue_rng, size=config.unsup.queue_size,
                                 dim=config.unsup.projector_dim)
  return common.new_state(rng, params, batch_stats, tx, key_encoder=True,
                          extras={"queue": queue})


def state_shardings(abstract_state, mesh, config):
  del config
  return common.replicated_shardings(abstract_state, mesh)


def grouped_forward(model, params, batch_stats, images, *, group_size):
  """Train-mode forward with BatchNorm statistics per group of `group_size` examples
  (0 or >= B: the whole batch). Running statistics: the mean of the groups' updates."""
  batch = images.shape[0]
  if not group_size or group_size >= batch:
    return common.forward(model, params, batch_stats, images, train=True)
  if batch % group_size:
    raise ValueError(f"batch {batch} is not a multiple of bn_group_size {group_size}")
  groups = images.reshape((batch // group_size, group_size) + images.shape[1:])
  out, stats = jax.vmap(
      lambda x: common.forward(model, params, batch_stats, x, train=True))(groups)
  out = jax.tree.map(lambda o: o.reshape((batch,) + o.shape[2:]), out)
  return out, jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)


def _keys(state, key_params, images, rng, cfg, model):
  """Normalised key projections `[B, D]`, computed on a shuffled batch (shuffled BN)."""
  perm = jax.random.permutation(rng, images.shape[0])
  out, key_stats = grouped_forward(model, key_params, state.key_batch_stats,
                                   images[perm], group_size=cfg.bn_group_size)
  keys = losses.l2_normalize(out["projection"])[jnp.argsort(perm)]
  return jax.lax.stop_gradient(keys), key_stats


def train_step(state, batch, *, model, tx, cfg):
  """`batch`: image_q, image_k [B, H, W, 3] (two views; labels unused)."""
  rng, shuffle_rng, mix_rng = jax.random.split(state.rng, 3)
  key_params = ema.ema_update(state.key_params, state.params,
                              momentum=cfg.momentum(state.step))
  k, key_stats = _keys(state, key_params, batch["image_k"], shuffle_rng, cfg, model)
  queue = state.extras["queue"]
  images = batch["image_q"]
  batch_size = images.shape[0]
  if cfg.use_cutmix:  # partner of query i: query i-1 (its key: k rolled by one)
    mixed, lam = cutmix.cutmix(mix_rng, images, jnp.roll(images, 1, axis=0),
                               alpha=cfg.cutmix_alpha)
    images = jnp.concatenate([images, mixed])

  def loss_fn(params):
    out, batch_stats = grouped_forward(model, params, state.batch_stats, images,
                                       group_size=cfg.bn_group_size)
    z = losses.l2_normalize(out["projection"])
    plain = losses.info_nce_loss(query=z[:batch_size], key=k, queue=queue.keys,
                                 temperature=cfg.temperature)  # Eq. (1)
    metrics = {"info_nce": plain}
    loss = plain
    if cfg.use_cutmix:
      mixed_loss = losses.mixed_info_nce_loss(
          query=z[batch_size:], key_a=k, key_b=jnp.roll(k, 1, axis=0), lam=lam,
          queue=queue.keys, temperature=cfg.temperature)  # Eq. (6)
      metrics["mixed_info_nce"] = mixed_loss
      loss = loss + cfg.mixed_weight * mixed_loss
    return loss, (batch_stats, metrics)

  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  params, opt_state = common.apply_gradients(state, grads, tx)
  state = state.replace(step=state.step + 1, rng=rng, params=params,
                        batch_stats=batch_stats, opt_state=opt_state,
                        key_params=key_params, key_batch_stats=key_stats,
                        extras={"queue": queues.enqueue_fifo(queue, keys=k)})
  return state, dict(metrics, loss=loss)


def make_train_step(model, tx, config):
  cfg = StepConfig(
      temperature=config.unsup.temperature,
      momentum=ema.momentum_schedule(config.unsup.ema_momentum),
      use_cutmix=config.unsup.cutmix, cutmix_alpha=config.unsup.cutmix_alpha,
      mixed_weight=config.unsup.mixed_weight, bn_group_size=config.unsup.bn_group_size)
  return functools.partial(train_step, model=model, tx=tx, cfg=cfg)
