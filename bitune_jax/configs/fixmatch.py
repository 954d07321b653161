"""FixMatch (Sohn et al., 2020) from a pre-trained or fine-tuned backbone: the
semi-supervised rows ("Semi-K") of the unsupervised fine-tuning paper's Table 5.

  bitune-train --config configs/fixmatch.py:demo --workdir /tmp/fixmatch-demo
      offline: 4 labelled digits per class of 5-9 and every training image of 5-9
      unlabelled, from the demo's supervised source model (digits 0-4).
  bitune-train --config configs/fixmatch.py:pets,resnet50,100 --workdir DIR \
      --config.data.kshot=4 --config.init_from=moco_v2.npz
      Semi-4 on Pet from a converted checkpoint; for "+ Our Unsupft-T", first
      `bitune-export` an unsupervised fine-tuning run and give that file instead.

Labelled batch `batch_size` (weak views: flip and a translation of up to 12.5%),
`fixmatch.mu` times as many unlabelled images (weak and strong views: RandAugment,
2 ops of random magnitude, then CutOut), pseudo-labels from the weak view where its
confidence reaches `fixmatch.threshold`. Optimiser as FixMatch's: SGD with Nesterov
momentum 0.9, lr 0.03 for every parameter, weight decay 5e-4, cosine decay; B = 64,
mu = 7, threshold 0.95, unlabelled weight 1 (the unsupervised fine-tuning paper gives
no FixMatch hyper-parameters of its own).
"""

import ml_collections

from bitune_jax import models
from bitune_jax.training import config_base


def get_config(arg="demo"):
  config = config_base.base_config(arg, "fixmatch")
  config.fixmatch = ml_collections.ConfigDict(dict(
      threshold=0.95, mu=7, unlabelled_weight=1.0))
  config.batch_size = 64
  if not models.is_vit(config.arch):  # FixMatch's SGD (a ViT keeps the ViT recipe)
    config.lr = 0.03
    config.lr_mult.update({"backbone": 1.0, "head": 1.0, "projector": 1.0,
                           "source_head": 1.0})
    config.schedule = "cosine"
    config.weight_decay = 5e-4
  if arg in config_base.DEMOS:
    config.data.kshot = 4
    config.batch_size = 16
    config.fixmatch.mu = 3
  return config
