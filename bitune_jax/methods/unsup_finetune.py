"""Unsupervised fine-tuning: MoCo v2 on unlabeled target data with sparse source replay
and CutMix-mixed queries (the unsupervised fine-tuning paper).

* MoCo v2: MLP projector (F -> F -> 128), momentum key encoder, FIFO queue of
  negatives, InfoNCE at temperature 0.2 (`losses.info_nce_loss`).
* Source replay: a fixed random fraction of a source dataset joins the target pool
  (`config.unsup.replay_fraction`, 10% by default; the data assembles it).
* CutMix: each query is mixed with its neighbour in the batch (`data.views.cutmix`); the mixed
  query's loss is Eq. (6), `lam * InfoNCE(q_m, k_a) + (1 - lam) * InfoNCE(q_m, k_b)`
  (`losses.mixed_info_nce_loss`); unmixed queries keep plain InfoNCE.
* BatchNorm per group of `bn_group_size` examples (0: the whole batch), with the key
  batch shuffled across groups so that a key never shares statistics with its query.

Labels are never used in training; evaluation is on features
(`evaluation="features"`: retrieval, k-means, linear probe).
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from bitune_jax import ema, losses, models, queues
from bitune_jax.data.views import cutmix
from bitune_jax.methods import base, common


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
  dtype = jnp.bfloat16 if config.bf16 else jnp.float32
  return common.Network(arch=config.arch, num_classes=num_classes,
                        projector_dim=config.unsup.projector_dim,
                        projector_hidden=width if config.unsup.mlp else None, dtype=dtype,
                        head_init=common.head_init(config), drop_path=config.drop_path)


def init_extras(keys, params, batch_stats, *, model, config, data):
  del params, batch_stats, model, data
  return {"queue": queues.init_fifo_queue(keys[0], size=config.unsup.queue_size,
                                          dim=config.unsup.projector_dim)}


def grouped_forward(model, params, batch_stats, images, *, group_size, rng=None):
  """Train-mode forward with BatchNorm statistics per group of `group_size` examples
  (0 or >= B: the whole batch). Running statistics: the mean of the groups' updates.
  `rng`: drop-path's key (the query encoder's; see `common.forward`)."""
  batch = images.shape[0]
  if not group_size or group_size >= batch:
    return common.forward(model, params, batch_stats, images, train=True, rng=rng)
  if batch % group_size:
    raise ValueError(f"batch {batch} is not a multiple of bn_group_size {group_size}")
  groups = images.reshape((batch // group_size, group_size) + images.shape[1:])
  rngs = None if rng is None else jax.random.split(rng, batch // group_size)
  out, stats = jax.vmap(
      lambda x, r: common.forward(model, params, batch_stats, x, train=True, rng=r))(
          groups, rngs)
  out = jax.tree.map(lambda o: o.reshape((batch,) + o.shape[2:]), out)
  return out, jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)


def _keys(state, key_params, images, rng, cfg, model):
  """Normalised key projections `[B, D]`, computed on a shuffled batch (shuffled BN)."""
  perm = jax.random.permutation(rng, images.shape[0])
  out, key_stats = grouped_forward(model, key_params, state.key_batch_stats,
                                   images[perm], group_size=cfg.bn_group_size)
  keys = losses.l2_normalize(out["projection"])[jnp.argsort(perm)]
  return jax.lax.stop_gradient(keys), key_stats


def before(state, batch, *, model, cfg):
  """The key encoder moved by EMA, the keys, and the CutMix queries (`context`)."""
  rng, shuffle_rng, mix_rng = jax.random.split(state.rng, 3)
  key_params = ema.ema_update(state.key_params, state.params,
                              momentum=cfg.momentum(state.step))
  k, key_stats = _keys(state, key_params, batch["image_k"], shuffle_rng, cfg, model)
  images, lam = batch["image_q"], None
  if cfg.use_cutmix:  # partner of query i: query i-1 (its key: k rolled by one)
    mixed, lam = cutmix.cutmix(mix_rng, images, jnp.roll(images, 1, axis=0),
                               alpha=cfg.cutmix_alpha)
    images = jnp.concatenate([images, mixed])
  state = state.replace(rng=rng, key_params=key_params, key_batch_stats=key_stats)
  return state, {"keys": k, "images": images, "lam": lam}


def loss(params, state, batch, context, *, model, cfg):
  """InfoNCE (Eq. 1) [+ mixed_weight * the CutMix queries' (Eq. 6)]. `batch`: image_q,
  image_k [B, H, W, 3] (two views; labels unused)."""
  k, batch_size = context["keys"], batch["image_q"].shape[0]
  queue = state.extras["queue"]
  out, batch_stats = grouped_forward(model, params, state.batch_stats,
                                     context["images"], group_size=cfg.bn_group_size,
                                     rng=common.dropout_rng(state))
  z = losses.l2_normalize(out["projection"])
  plain = losses.info_nce_loss(query=z[:batch_size], key=k, queue=queue.keys,
                               temperature=cfg.temperature)  # Eq. (1)
  metrics = {"info_nce": plain}
  total = plain
  if cfg.use_cutmix:
    mixed_loss = losses.mixed_info_nce_loss(
        query=z[batch_size:], key_a=k, key_b=jnp.roll(k, 1, axis=0),
        lam=context["lam"], queue=queue.keys, temperature=cfg.temperature)  # Eq. (6)
    metrics["mixed_info_nce"] = mixed_loss
    total = total + cfg.mixed_weight * mixed_loss
  return total, (batch_stats, metrics, None)


def after(state, batch, context, aux, *, cfg):
  del batch, aux, cfg
  return state.replace(extras={"queue": queues.enqueue_fifo(state.extras["queue"],
                                                            keys=context["keys"])})


def step_config(config):
  return StepConfig(
      temperature=config.unsup.temperature,
      momentum=ema.momentum_schedule(config.unsup.ema_momentum),
      use_cutmix=config.unsup.cutmix, cutmix_alpha=config.unsup.cutmix_alpha,
      mixed_weight=config.unsup.mixed_weight, bn_group_size=config.unsup.bn_group_size)


METHOD = base.Method(
    name="unsup_finetune", sections=("unsup",), views="two",
    replay_fraction=lambda config: config.unsup.replay_fraction,
    evaluation="features",
    rules={"unsup.temperature": base.POSITIVE, "unsup.ema_momentum": base.EMA,
           "unsup.mixed_weight": base.NON_NEGATIVE,
           "unsup.cutmix_alpha": base.POSITIVE,
           "unsup.replay_fraction": ("in [0, 1)", lambda v: 0 <= v < 1)},
    build_model=build_model, extra_keys=1, init_extras=init_extras,
    key_encoder=lambda config: True, step_config=step_config, before=before,
    loss=loss, after=after)
