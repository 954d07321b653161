"""Unsupervised fine-tuning: MoCo v2 on unlabeled target data + sparse source replay +
CutMix-mixed queries (Eq. 6). Labels are not used; evaluated on features (top-5
retrieval, k-means BCubed precision, linear probe; `bitune-eval --workdir DIR`).

  bitune-train --config configs/unsup_finetune.py:demo --workdir /tmp/unsup-demo
      offline: digits 5-9 unlabeled, 10% of digits 0-4 replayed, from the demo's
      supervised source model.
  bitune-train --config configs/unsup_finetune.py:cub,resnet50,100 --workdir DIR \
      --config.init_from=moco_v2.npz
      the paper's setting (MoCo v2 ResNet-50 continued on the target data).

Ablations: --config.unsup.replay_fraction=0 (no replay), --config.unsup.cutmix=False.
"""

import ml_collections

from bitune_jax import models
from bitune_jax.training import config_base


def get_config(arg="demo"):
  config = config_base.base_config(arg, "unsup_finetune")
  config.unsup = ml_collections.ConfigDict(dict(
      queue_size=65536, projector_dim=128, mlp=True, temperature=0.2, ema_momentum=0.999,
      replay_fraction=0.1, cutmix=True, cutmix_alpha=1.0, mixed_weight=1.0,
      bn_group_size=32))
  config.schedule = "cosine"
  config.lr_mult.update({"backbone": 1.0, "projector": 1.0, "head": 0.0})  # head unused
  if models.is_vit(config.arch):
    # MoCo v3's ViT optimisation (AdamW, lr 1.5e-4 per 256 images, weight decay 0.1,
    # warmup then cosine, the momentum 0.99) around this method's loss, queue, replay
    # and CutMix; with the recipe's layer-wise decay (a pre-trained ViT is fine-tuned).
    config.lr = 1.5e-4 * config.batch_size / 256
    config.weight_decay = 0.1
    config.warmup_fraction = 0.1
    config.unsup.ema_momentum = 0.99
  else:
    config.lr = 0.03  # MoCo v2 (batch 256), cosine
    config.weight_decay = 1e-4
  config.data.views = "moco"  # MoCo v2 augmentations (tfds datasets)
  if arg in config_base.DEMOS:
    config.lr = 1e-3 if models.is_vit(config.arch) else 0.05
    config.unsup.queue_size = 512
    config.unsup.bn_group_size = 8
  return config
