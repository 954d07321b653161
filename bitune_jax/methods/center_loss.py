"""Center loss (Wen, Zhang, Li and Qiao, ECCV 2016) added to fine-tuning's cross-entropy.

Loss: `CE + lambda * L_C` (Wen et al. Eq. 5) with
  `L_C = 1/2 * mean_i ||h_i - c_{y_i}||^2`                              (Eq. 2)
over the pooled backbone features `h [B, F]` and one center per class, `c [C, F]`
(`extras["centers"]`, zeros at init). Wen et al. sum over the mini-batch; we take the
batch mean, so that lambda does not scale with the batch size.

The centers are not parameters: after the loss, each step applies Wen et al.'s rule
(Eq. 4 and Algorithm 1) with this batch's features (no gradient):
  `delta_c_j = sum_{i: y_i = j} (c_j - h_i) / (1 + n_j)`,  n_j = #{i: y_i = j},
  `c_j <- c_j - alpha * delta_c_j`;
classes absent from the batch keep their center. Defaults: lambda = 0.003 and
alpha = 0.5, Wen et al.'s setting (`config.center_loss.trade_off`, `.alpha`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from bitune_jax.methods import base, common

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class StepConfig:
  trade_off: float  # lambda, Eq. (5)
  center_lr: float  # alpha, Eq. (4)


# --------------------------------------------------------------------------- loss
def center_loss(*, features, centers, labels):
  """`1/2 * mean_i ||h_i - c_{y_i}||^2` (Wen et al. Eq. 2, batch mean), float32.

  Args:
    features: `[B, F]` features h.
    centers: `[C, F]` class centers c.
    labels: `[B]` int class of each feature.

  Returns:
    Scalar float32 loss; gradient `(h_i - c_{y_i}) / B` w.r.t. h_i (Eq. 3, / B).
  """
  diff = features.astype(jnp.float32) - centers.astype(jnp.float32)[labels]  # [B, F]
  return 0.5 * jnp.mean(jnp.sum(jnp.square(diff), axis=-1))


def update_centers(*, centers, features, labels, alpha):
  """Wen et al.'s center update (Eq. 4): `c_j <- c_j - alpha * delta_c_j`.

  Args:
    centers: `[C, F]` class centers.
    features: `[B, F]` this batch's features (gradient stopped here).
    labels: `[B]` int class of each feature, in [0, C).
    alpha: the centers' learning rate.

  Returns:
    The updated centers `[C, F]` float32.
  """
  centers = centers.astype(jnp.float32)
  features = jax.lax.stop_gradient(features).astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, centers.shape[0], dtype=jnp.float32)  # [B, C]
  count = jnp.sum(onehot, axis=0)  # [C]  n_j
  feature_sum = jnp.einsum("bc,bf->cf", onehot, features, precision=_HIGHEST)  # [C, F]
  delta = (count[:, None] * centers - feature_sum) / (1.0 + count[:, None])  # [C, F]
  return centers - alpha * delta


# --------------------------------------------------------------------------- method
def init_extras(keys, params, batch_stats, *, model, config, data):
  del keys, batch_stats, config, data
  feat = params["head"]["dense"]["kernel"].shape[0]
  return {"centers": jnp.zeros((model.num_classes, feat), jnp.float32)}  # [C, F]


def loss(params, state, batch, context, *, model, cfg):
  """CE + lambda * center loss (Eq. 5). `batch`: image, label [B]."""
  del context
  labels = batch["label"]
  out, batch_stats = common.forward(model, params, state.batch_stats, batch["image"],
                                    train=True, rng=common.dropout_rng(state))
  ce = common.ce_loss(out, labels)
  lc = center_loss(features=out["features"], centers=state.extras["centers"],
                   labels=labels)
  metrics = {"ce": ce, "center_loss": lc,
             "train_accuracy": common.accuracy(out["logits"], labels)}
  return ce + cfg.trade_off * lc, (batch_stats, metrics, out["features"])


def after(state, batch, context, features, *, cfg):
  """The center update (Eq. 4), from this batch's features."""
  del context
  return state.replace(extras={"centers": update_centers(
      centers=state.extras["centers"], features=features, labels=batch["label"],
      alpha=cfg.center_lr)})


METHOD = base.Method(
    name="center_loss", sections=("center_loss",),
    rules={"center_loss.trade_off": base.NON_NEGATIVE,
           "center_loss.alpha": base.NON_NEGATIVE},
    init_extras=init_extras, loss=loss, after=after,
    step_config=lambda config: StepConfig(trade_off=config.center_loss.trade_off,
                                          center_lr=config.center_loss.alpha))
