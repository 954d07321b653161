"""Co-Tuning: the pre-trained classifier keeps training on R[y_t] = p(y_s | y_t).

  bitune-train --config configs/cotuning.py:demo --workdir /tmp/cotuning-demo
      offline: the digits transfer of the quick start (source head: digits 0-4).
  bitune-train --config configs/cotuning.py:cub,resnet50,15 --workdir DIR \
      --config.init_from=resnet50.npz      # a supervised ImageNet checkpoint (1000-way fc)
      the paper's setting (Table 2: CUB-200-2011, ResNet-50, 15% of the training data).

Overrides: --config.cotuning.relationship=direct|reverse, --config.cotuning.trade_off=2.3,
--config.cotuning.calibrate=False, --config.cotuning.relationship_file=PATH.
"""

from bitune_jax import config_base


def get_config(arg="demo"):
  return config_base.base_config(arg, "cotuning")
