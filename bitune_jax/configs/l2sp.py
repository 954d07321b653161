"""L2-SP: cross-entropy + an L2 penalty towards the pre-trained weights (Li et al. 2018).

  bitune-train --config configs/l2sp.py:demo --workdir /tmp/l2sp-demo
      offline: the digits transfer of the quick start (pre-train on 0-4, fine-tune 5-9).
  bitune-train --config configs/l2sp.py:cub,resnet50,25 --workdir DIR \
      --config.init_from=resnet50.npz    # a bitune-convert output
      a competitor of the Bi-tuning paper (Table 1: CUB-200-2011, ResNet-50, 25%).

Penalty `alpha/2 ||w_backbone - w0||^2 + beta/2 ||w_head||^2`, alpha = beta = 0.01
(Li et al. choose alpha and beta by cross-validation; the Bi-tuning paper does not give
its values). The penalty replaces weight decay, which is set to 0 here.

Overrides: --config.l2sp.alpha=0.1, --config.l2sp.beta=0.01, ...
"""

import ml_collections

from bitune_jax.training import config_base


def get_config(arg="demo"):
  config = config_base.base_config(arg, "l2sp")
  config.l2sp = ml_collections.ConfigDict(dict(alpha=0.01, beta=0.01))
  config.weight_decay = 0.0  # the L2-SP penalty is the regulariser
  return config
