"""L2-SP (Li, Grandvalet and Davoine, ICML 2018): fine-tuning with an L2 penalty towards
the starting point, the pre-trained weights w0, instead of towards zero.

Loss (L2-SP's regulariser Omega(w) added to the cross-entropy):
  `CE + alpha / 2 * ||w_S - w0_S||^2 + beta / 2 * ||w_new||^2`,
where `w_S` are all backbone parameters (convolution kernels and BatchNorm scales and
biases; BatchNorm statistics are not parameters) and `w_new` the new classifier head
(kernel and bias). Defaults alpha = beta = 0.01 (`config.l2sp`).

Weight decay. The penalty IS the regulariser: `configs/l2sp.py` sets
`config.weight_decay = 0`, so that the optimizer's coupled decay (towards zero) does not
pull the backbone away from w0. An override with a non-zero decay is allowed (it adds to
the penalty) and logged as a warning.

The starting point w0. The train loop loads the pre-trained backbone into
`state.params["backbone"]` AFTER `init_state` (`train._with_pretrained`), so w0 cannot
be taken at init. `extras["w0"]` starts as a copy of the (random) backbone and the
jitted step replaces it by the current backbone while `state.step == 0`: the penalty of
the first step is exactly 0 and every later step measures the distance to the weights
the training started from, whatever was loaded. A resumed run (step > 0) keeps the w0
of its checkpoint.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from bitune_jax.methods import common

log = logging.getLogger("bitune_jax")
TWO_VIEWS = False


@dataclasses.dataclass(frozen=True)
class StepConfig:
  alpha: float  # weight of ||w_S - w0_S||^2 / 2 (the pre-trained part)
  beta: float  # weight of ||w_new||^2 / 2 (the new head)


# --------------------------------------------------------------------------- penalty
def squared_distance(*, params, reference):
  """`sum over leaves of ||params - reference||^2` in float32; same pytree structure."""
  sq = jax.tree.map(
      lambda w, w0: jnp.sum(jnp.square(w.astype(jnp.float32) - w0.astype(jnp.float32))),
      params, reference)
  return sum(jax.tree.leaves(sq), jnp.zeros((), jnp.float32))


def l2sp_penalty(*, backbone, w0, head, alpha, beta):
  """L2-SP's Omega(w) = `alpha/2 ||w_S - w0_S||^2 + beta/2 ||w_new||^2`.

  Args:
    backbone: pytree of the backbone parameters w_S.
    w0: pytree of the starting point w0_S, same structure as `backbone`.
    head: pytree of the new head's parameters w_new.
    alpha: weight of the starting-point term.
    beta: weight of the plain L2 term on the new head.

  Returns:
    `(penalty, sp, l2)`: the scalar penalty and its two squared norms (float32).
  """
  sp = squared_distance(params=backbone, reference=w0)
  l2 = squared_distance(params=head, reference=jax.tree.map(jnp.zeros_like, head))
  return 0.5 * alpha * sp + 0.5 * beta * l2, sp, l2


# --------------------------------------------------------------------------- method
def build_model(config, num_classes):
  return common.build_network(config, num_classes)


def init_state(rng, sample_images, *, model, tx, config):
  del config
  rng, init_rng = jax.random.split(rng)
  params, batch_stats = common.init_variables(model, init_rng, sample_images)
  # A placeholder of the right shape: replaced by the loaded backbone at step 0.
  w0 = jax.tree.map(jnp.copy, params["backbone"])
  return common.new_state(rng, params, batch_stats, tx, extras={"w0": w0})


def state_shardings(abstract_state, mesh, config):
  del config
  return common.replicated_shardings(abstract_state, mesh)


def starting_point(state):
  """w0: the current backbone at step 0, else `extras["w0"]` (no gradient)."""
  first = state.step == 0
  w0 = jax.tree.map(lambda ref, w: jnp.where(first, w, ref), state.extras["w0"],
                    state.params["backbone"])
  return jax.lax.stop_gradient(w0)


def train_step(state, batch, *, model, tx, cfg):
  """CE + L2-SP penalty. `batch`: image [B, H, W, 3], label [B]."""
  w0 = starting_point(state)

  def loss_fn(params):
    out, batch_stats = common.forward(model, params, state.batch_stats, batch["image"],
                                      train=True)
    ce = common.ce_loss(out, batch["label"])
    penalty, sp, l2 = l2sp_penalty(backbone=params["backbone"], w0=w0,
                                   head=params["head"], alpha=cfg.alpha, beta=cfg.beta)
    metrics = {"ce": ce, "l2sp": penalty, "sp_distance": sp, "head_sq_norm": l2,
               "train_accuracy": common.accuracy(out["logits"], batch["label"])}
    return ce + penalty, (batch_stats, metrics)

  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  params, opt_state = common.apply_gradients(state, grads, tx)
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state, extras={"w0": w0})
  return state, dict(metrics, loss=loss)


def make_train_step(model, tx, config):
  if config.weight_decay:
    log.warning("l2sp with weight_decay=%g: the optimizer also decays every group "
                "towards 0, on top of the L2-SP penalty (configs/l2sp.py sets 0)",
                config.weight_decay)
  cfg = StepConfig(alpha=config.l2sp.alpha, beta=config.l2sp.beta)
  return functools.partial(train_step, model=model, tx=tx, cfg=cfg)
