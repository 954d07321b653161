"""Center loss: cross-entropy + lambda/2 mean ||h_i - c_{y_i}||^2 (Wen et al. 2016).

  bitune-train --config configs/center_loss.py:demo --workdir /tmp/center-demo
      offline: the digits transfer of the quick start (pre-train on 0-4, fine-tune 5-9).
  bitune-train --config configs/center_loss.py:cub,resnet50,25 --workdir DIR \
      --config.init_from=moco_v2.npz     # a MoCo checkpoint through bitune-convert
      a baseline of the Bi-tuning paper (Table 3: ResNet-50 pre-trained by MoCo,
      CUB-200-2011, 25%).

lambda (`trade_off`) = 0.003 and center learning rate alpha = 0.5: Wen et al.'s
setting (the Bi-tuning paper does not give its values).

Overrides: --config.center_loss.trade_off=0.003, --config.center_loss.alpha=0.5
"""

import ml_collections

from bitune_jax.training import config_base


def get_config(arg="demo"):
  config = config_base.base_config(arg, "center_loss")
  config.center_loss = ml_collections.ConfigDict(dict(trade_off=0.003, alpha=0.5))
  return config
