"""Co-Tuning: the pre-trained classifier keeps training on R[y_t] = p(y_s | y_t).

  bitune-train --config configs/cotuning.py:demo --workdir /tmp/cotuning-demo
      offline: the digits transfer of the quick start (source head: digits 0-4).
  bitune-train --config configs/cotuning.py:cub,resnet50,15 --workdir DIR \
      --config.init_from=resnet50.npz      # a supervised ImageNet checkpoint (1000-way fc)
      the paper's setting (Table 2: CUB-200-2011, ResNet-50, 15% of the training data).

Overrides: --config.cotuning.relationship=direct|reverse, --config.cotuning.trade_off=2.3,
--config.cotuning.calibrate=False, --config.cotuning.relationship_file=PATH.
"""

import ml_collections

from bitune_jax import relationship
from bitune_jax.training import config_base


def get_config(arg="demo"):
  config = config_base.base_config(arg, "cotuning")
  config.cotuning = ml_collections.ConfigDict(dict(
      # source_temperature: source probabilities are softmax(logits / T); the official
      # code's scale 0.884 (T = 1.131), the calibrated one of the ImageNet ResNet-50,
      # is what the papers' numbers used, for every backbone (the demo sets its own).
      trade_off=2.3, relationship="reverse", calibrate=True,
      source_temperature=1.0 / relationship.OFFICIAL_SOURCE_SCALE,
      holdout_fraction=0.2, source_classes=1000, relationship_file=""))
  if arg in config_base.DEMOS:
    config.cotuning.source_classes = 5  # the demo's source model: digits 0-4
    # Its own source model, not the ImageNet ResNet-50 that the official 0.884
    # calibrates.
    config.cotuning.source_temperature = 1.0
  return config
