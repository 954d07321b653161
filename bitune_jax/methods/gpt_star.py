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
import functools
from typing import Callable

import jax

from bitune_jax import ema, losses, queues
from bitune_jax.methods import common

TWO_VIEWS = True


@dataclasses.dataclass(frozen=True)
class StepConfig:
  temperature: float
  trade_off: float
  momentum: Callable  # step -> key-encoder momentum


def build_model(config, num_classes):
  return common.build_network(config, num_classes,
                              projector_dim=config.gpt_star.projector_dim)


def init_state(rng, sample_images, *, model, tx, config):
  rng, init_rng, queue_rng = jax.random.split(rng, 3)
  params, batch_stats = common.init_variables(model, init_rng, sample_images)
  queue = queues.init_fifo_queue(queue_rng, size=config.gpt_star.queue_size,
                                 dim=model.projector_dim)  # keys [N, D]
  # The key encoder starts as a copy of the query encoder.
  return common.new_state(rng, params, batch_stats, tx, key_encoder=True,
                          extras={"queue": queue})


def state_shardings(abstract_state, mesh, config):
  """Everything replicated (the queue is small: N x 128)."""
  del config
  return common.replicated_shardings(abstract_state, mesh)


def train_step(state, batch, *, model, tx, cfg):
  """`batch`: image_q, image_k [B, H, W, 3] (two views), label [B]."""
  labels = batch["label"]
  key_params = ema.ema_update(state.key_params, state.params,
                              momentum=cfg.momentum(state.step))
  key_out, key_batch_stats = common.forward(model, key_params, state.key_batch_stats,
                                            batch["image_k"], train=True)
  z_k = jax.lax.stop_gradient(losses.l2_normalize(key_out["projection"]))  # [B, D]
  queue = state.extras["queue"]

  def loss_fn(params):
    out, batch_stats = common.forward(model, params, state.batch_stats, batch["image_q"],
                                      train=True)
    ce = common.ce_loss(out, labels)
    info_nce = losses.info_nce_loss(
        query=losses.l2_normalize(out["projection"]), key=z_k, queue=queue.keys,
        temperature=cfg.temperature)  # Bi-tuning Eq. (1)
    loss = ce + cfg.trade_off * info_nce
    metrics = {"ce": ce, "info_nce": info_nce,
               "train_accuracy": common.accuracy(out["logits"], labels)}
    return loss, (batch_stats, metrics)

  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  params, opt_state = common.apply_gradients(state, grads, tx)
  queue = queues.enqueue_fifo(queue, keys=z_k)  # after the loss
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state, key_params=key_params,
                        key_batch_stats=key_batch_stats, extras={"queue": queue})
  return state, dict(metrics, loss=loss)


def make_train_step(model, tx, config):
  cfg = StepConfig(
      temperature=config.gpt_star.temperature, trade_off=config.gpt_star.trade_off,
      momentum=ema.momentum_schedule(config.gpt_star.ema_momentum))
  return functools.partial(train_step, model=model, tx=tx, cfg=cfg)
