"""BSS: cross-entropy + Batch Spectral Shrinkage of the features (Chen et al. 2019).

  bitune-train --config configs/bss.py:demo --workdir /tmp/bss-demo
      offline: the digits transfer of the quick start (pre-train on 0-4, fine-tune 5-9).
  bitune-train --config configs/bss.py:cub,resnet50,25 --workdir DIR \
      --config.init_from=resnet50.npz    # a bitune-convert output
      a competitor in the Bi-tuning paper (Table 1: CUB-200-2011, ResNet-50, 25%).

Penalty `eta * sum_{i=1..k} sigma_{-i}^2` over the batch feature matrix [B, F], with
Chen et al.'s eta = 0.001 and k = 1.

Overrides: --config.bss.eta=0.001, --config.bss.k=1
"""

import ml_collections

from bitune_jax.training import config_base


def get_config(arg="demo"):
  config = config_base.base_config(arg, "bss")
  config.bss = ml_collections.ConfigDict(dict(eta=0.001, k=1))
  return config
