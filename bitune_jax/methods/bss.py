"""Batch Spectral Shrinkage, BSS (Chen, Wang, Fu, Long and Wang, NeurIPS 2019).

Loss: `CE + eta * sum_{i=1..k} sigma_{-i}^2`, where sigma_{-1} <= sigma_{-2} <= ... are
the k smallest singular values of the batch's feature matrix `F = [f_1 ... f_B]`
(the pooled backbone features, `[B, F]`). Shrinking the small singular values
suppresses the spectral components that transfer badly (negative transfer) and that
the fine-tuned features drift into (catastrophic forgetting). Defaults: eta = 0.001,
k = 1 (`config.bss`), the paper's setting.

The SVD is of the GLOBAL batch (under `jit` the sharded features are gathered), in
float32, singular values only; its gradient `dsigma_i = u_i^T dF v_i` is well defined
for any spectrum (no 1 / (sigma_i^2 - sigma_j^2) terms without the vectors).
"""

import dataclasses

import jax.numpy as jnp

from bitune_jax import models
from bitune_jax.methods import base, common


@dataclasses.dataclass(frozen=True)
class StepConfig:
  eta: float  # weight of the penalty
  k: int  # how many of the smallest singular values are shrunk


def bss_penalty(*, features, k=1):
  """`sum_{i=1..k} sigma_{-i}^2`: the k smallest squared singular values of a batch.

  Args:
    features: `[B, F]` batch feature matrix (any float dtype; computed in float32).
    k: number of smallest singular values, `1 <= k <= min(B, F)`.

  Returns:
    Scalar float32 (not yet multiplied by eta).
  """
  if features.ndim != 2:
    raise ValueError(f"bss_penalty: features must be [B, F], got {features.shape}")
  if not 1 <= k <= min(features.shape):
    raise ValueError(f"bss_penalty: k must be in [1, min(B, F)={min(features.shape)}], "
                     f"got {k}")
  sigma = jnp.linalg.svd(features.astype(jnp.float32), compute_uv=False)  # [min(B, F)]
  # `svd` returns them in descending order: the k smallest are the last k.
  return jnp.sum(jnp.square(sigma[-k:]))


def validate(config):
  limit = min(config.batch_size, models.num_features(config.arch))
  if not 1 <= config.bss.k <= limit:
    raise ValueError(f"bss.k must be in [1, min(batch_size, features)={limit}], got "
                     f"{config.bss.k}")


def loss(params, state, batch, context, *, model, cfg):
  """CE + eta * BSS. `batch`: image [B, H, W, 3], label [B]."""
  del context
  out, batch_stats = common.forward(model, params, state.batch_stats, batch["image"],
                                    train=True, rng=common.dropout_rng(state))
  ce = common.ce_loss(out, batch["label"])
  shrinkage = bss_penalty(features=out["features"], k=cfg.k)  # [B, F] -> []
  metrics = {"ce": ce, "bss": shrinkage,
             "train_accuracy": common.accuracy(out["logits"], batch["label"])}
  return ce + cfg.eta * shrinkage, (batch_stats, metrics, None)


METHOD = base.Method(
    name="bss", sections=("bss",), rules={"bss.eta": base.NON_NEGATIVE},
    validate=validate, step_config=lambda config: StepConfig(eta=config.bss.eta,
                                                             k=config.bss.k),
    loss=loss)
