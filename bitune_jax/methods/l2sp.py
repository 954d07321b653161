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

The starting point w0. The train loop loads the pre-trained backbone into the state
after `init_state`, so `extras["w0"]` starts as a placeholder of its shape, and
`prepare` (once, before the first step) copies the backbone the training starts from
into it, whatever was loaded: the penalty of the first step is exactly 0. DELTA keeps
its w* the same way (`base.starting_point`). A resumed run keeps the w0 of its
checkpoint.
"""

import dataclasses

import jax
import jax.numpy as jnp

from bitune_jax.methods import base, common


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
def init_extras(keys, params, batch_stats, *, model, config, data):
  """A placeholder of w0's shape: `prepare` puts the loaded backbone in."""
  del keys, batch_stats, model, config, data
  return {"w0": jax.tree.map(jnp.copy, params["backbone"])}


def prepare(state, *, model, config, data, mesh, workdir, pretrained):
  """w0: the backbone the training starts from (the loaded one), before step 1."""
  del model, config, data, mesh, workdir, pretrained
  return state.replace(extras={"w0": base.starting_point(state)["w0"]})


def loss(params, state, batch, context, *, model, cfg):
  """CE + L2-SP penalty. `batch`: image [B, H, W, 3], label [B]."""
  del context
  out, batch_stats = common.forward(model, params, state.batch_stats, batch["image"],
                                    train=True, rng=common.dropout_rng(state))
  ce = common.ce_loss(out, batch["label"])
  penalty, sp, l2 = l2sp_penalty(backbone=params["backbone"],
                                 w0=jax.lax.stop_gradient(state.extras["w0"]),
                                 head=params["head"], alpha=cfg.alpha, beta=cfg.beta)
  metrics = {"ce": ce, "l2sp": penalty, "sp_distance": sp, "head_sq_norm": l2,
             "train_accuracy": common.accuracy(out["logits"], batch["label"])}
  return ce + penalty, (batch_stats, metrics, None)


def step_config(config):
  base.warn_weight_decay(config, "the L2-SP penalty")
  return StepConfig(alpha=config.l2sp.alpha, beta=config.l2sp.beta)


METHOD = base.Method(
    name="l2sp", sections=("l2sp",),
    rules={"l2sp.alpha": base.NON_NEGATIVE, "l2sp.beta": base.NON_NEGATIVE},
    init_extras=init_extras, prepare=prepare, step_config=step_config, loss=loss)
