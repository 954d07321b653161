"""GPT*: the Bi-tuning paper's baseline that fine-tunes "in GPT's style" (Radford et al.)
with a contrastive instead of a predictive auxiliary loss (Bi-tuning Sec. 5, Table 3).

Loss: `CE + trade_off * InfoNCE` (Bi-tuning Eq. 1), where the InfoNCE is MoCo's: the
query `z_q = normalize(projector(h_q))` of the first view, its positive key
`z_k = normalize(key_projector(h_k))` from a momentum (EMA) key encoder on the second
view, and a FIFO queue of N negatives (`extras["queue"]`, `[N, D]`). Every other
instance, of any class, is a negative: the "naive combination" that Bi-tuning's CCL
(Eq. 4) replaces by class-aware positives.

Pieces shared with Bi-tuning (`bituning.py`): the projector is one Dense F -> D
(`config.gpt_star.projector_dim`, 128 as Bi-tuning's); the key encoder is a copy of the
query encoder (backbone, head and projector) with its own BatchNorm statistics, updated
by `key <- m key + (1 - m) query` (m = 0.999). Order within a step: EMA update, keys of
the second view, losses against the queue as it was before this batch, then enqueue.
Defaults (`config.gpt_star`): queue 1024, tau 0.07 (Bi-tuning's), trade_off 1.
"""

import dataclasses
from typing import Callable

import jax

from bitune_jax import ema, losses, queues
from bitune_jax.methods import base, common


@dataclasses.dataclass(frozen=True)
class StepConfig:
  temperature: float
  trade_off: float
  momentum: Callable  # step -> key-encoder momentum


def build_model(config, num_classes):
  return common.build_network(config, num_classes,
                              projector_dim=config.gpt_star.projector_dim)


def init_extras(keys, params, batch_stats, *, model, config, data):
  del params, batch_stats, data
  return {"queue": queues.init_fifo_queue(keys[0], size=config.gpt_star.queue_size,
                                          dim=model.projector_dim)}  # keys [N, D]


def before(state, batch, *, model, cfg):
  """The key encoder moved by EMA, then the normalised keys of the second view."""
  key_params = ema.ema_update(state.key_params, state.params,
                              momentum=cfg.momentum(state.step))
  key_out, key_batch_stats = common.forward(model, key_params, state.key_batch_stats,
                                            batch["image_k"], train=True)
  z_k = jax.lax.stop_gradient(losses.l2_normalize(key_out["projection"]))  # [B, D]
  return state.replace(key_params=key_params, key_batch_stats=key_batch_stats), z_k


def loss(params, state, batch, z_k, *, model, cfg):
  """CE + trade_off * InfoNCE (Bi-tuning Eq. 1). `batch`: image_q, image_k
  [B, H, W, 3] (two views), label [B]."""
  labels = batch["label"]
  out, batch_stats = common.forward(model, params, state.batch_stats, batch["image_q"],
                                    train=True, rng=common.dropout_rng(state))
  ce = common.ce_loss(out, labels)
  info_nce = losses.info_nce_loss(
      query=losses.l2_normalize(out["projection"]), key=z_k,
      queue=state.extras["queue"].keys, temperature=cfg.temperature)
  metrics = {"ce": ce, "info_nce": info_nce,
             "train_accuracy": common.accuracy(out["logits"], labels)}
  return ce + cfg.trade_off * info_nce, (batch_stats, metrics, None)


def after(state, batch, z_k, aux, *, cfg):
  """The keys enqueued, after the loss."""
  del batch, aux, cfg
  return state.replace(extras={"queue": queues.enqueue_fifo(state.extras["queue"],
                                                            keys=z_k)})


def step_config(config):
  return StepConfig(
      temperature=config.gpt_star.temperature, trade_off=config.gpt_star.trade_off,
      momentum=ema.momentum_schedule(config.gpt_star.ema_momentum))


METHOD = base.Method(
    name="gpt_star", sections=("gpt_star",), views="two",
    rules={"gpt_star.temperature": base.POSITIVE,
           "gpt_star.trade_off": base.NON_NEGATIVE, "gpt_star.ema_momentum": base.EMA},
    moved={"gpt_star.projector_dim": "bituning.projector_dim"},  # GPT* read Bi-tuning's
    build_model=build_model, extra_keys=1, init_extras=init_extras,
    key_encoder=lambda config: True, step_config=step_config, before=before,
    loss=loss, after=after)
