"""Vanilla fine-tuning: cross-entropy on a new head; the baseline of every comparison."""

import functools

import jax

from bitune_jax.methods import common

TWO_VIEWS = False


def build_model(config, num_classes):
  return common.build_network(config, num_classes)


def init_state(rng, sample_images, *, model, tx, config):
  del config
  rng, init_rng = jax.random.split(rng)
  params, batch_stats = common.init_variables(model, init_rng, sample_images)
  return common.new_state(rng, params, batch_stats, tx)


def state_shardings(abstract_state, mesh, config):
  del config
  return common.replicated_shardings(abstract_state, mesh)


def train_step(state, batch, *, model, tx):
  """One SGD step of cross-entropy. `batch`: image [B, H, W, 3], label [B]."""
  def loss_fn(params):
    out, batch_stats = common.forward(model, params, state.batch_stats, batch["image"],
                                      train=True)
    loss = common.ce_loss(out, batch["label"])
    return loss, (batch_stats, common.accuracy(out["logits"], batch["label"]))
  (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  params, opt_state = common.apply_gradients(state, grads, tx)
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state)
  return state, {"loss": loss, "ce": loss, "train_accuracy": acc}


def make_train_step(model, tx, config):
  del config
  return functools.partial(train_step, model=model, tx=tx)
