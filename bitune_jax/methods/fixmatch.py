"""FixMatch (Sohn et al., 2020), the semi-supervised rows of the unsupervised
fine-tuning paper (Table 5, "Semi-K": K labelled images per class and the whole
training set unlabelled), started from any converted or fine-tuned backbone.

Each step takes B labelled images (`batch_size`; their weak view) and `mu * B`
unlabelled ones (a weak and a strong view: `bitune_jax.data.randaugment`), forwards
the three together (BatchNorm over all of them, as FixMatch's reference does), and
minimises `CE(labelled) + unlabelled_weight * l_u`, where `l_u` is the strong views'
cross-entropy against the weak views' confident pseudo-labels (`losses.fixmatch_loss`,
threshold 0.95). Metrics: `ce`, `unlabelled` (l_u) and `mask_rate` (the fraction of
pseudo-labels used).
"""

import dataclasses

import jax.numpy as jnp

from bitune_jax import losses
from bitune_jax.methods import base, common


@dataclasses.dataclass(frozen=True)
class StepConfig:
  threshold: float
  unlabelled_weight: float


def loss(params, state, batch, context, *, model, cfg):
  """`batch`: image [B, H, W, 3] (labelled, weak), label [B], u_weak and u_strong
  [U, H, W, 3] (the unlabelled images' two views)."""
  del context
  labels = batch["label"]
  labelled, unlabelled = labels.shape[0], batch["u_weak"].shape[0]
  images = jnp.concatenate([batch["image"], batch["u_weak"], batch["u_strong"]])
  out, batch_stats = common.forward(model, params, state.batch_stats, images, train=True,
                                    rng=common.dropout_rng(state))
  logits = out["logits"]  # [B + 2U, C]
  ce = losses.cross_entropy_loss(logits=logits[:labelled], labels=labels)
  l_u, mask_rate = losses.fixmatch_loss(
      logits_weak=logits[labelled:labelled + unlabelled],
      logits_strong=logits[labelled + unlabelled:], threshold=cfg.threshold)
  metrics = {"ce": ce, "unlabelled": l_u, "mask_rate": mask_rate,
             "train_accuracy": common.accuracy(logits[:labelled], labels)}
  return ce + cfg.unlabelled_weight * l_u, (batch_stats, metrics, None)


def step_config(config):
  return StepConfig(threshold=config.fixmatch.threshold,
                    unlabelled_weight=config.fixmatch.unlabelled_weight)


# The model and the state are vanilla fine-tuning's (a new head, no extras).
METHOD = base.Method(
    name="fixmatch", sections=("fixmatch",), views="weak_strong",
    unlabelled=lambda config: config.fixmatch.mu,
    rules={"fixmatch.threshold": ("in [0, 1]", lambda v: 0 <= v <= 1),
           "fixmatch.mu": base.COUNT, "fixmatch.unlabelled_weight": base.NON_NEGATIVE},
    step_config=step_config, loss=loss)
