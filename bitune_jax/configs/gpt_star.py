"""GPT*: cross-entropy + MoCo's InfoNCE on a projector (the Bi-tuning paper's baseline).

  bitune-train --config configs/gpt_star.py:demo --workdir /tmp/gpt-star-demo
      offline: the digits transfer of the quick start (pre-train on 0-4, fine-tune 5-9).
  bitune-train --config configs/gpt_star.py:cub,resnet50,25 --workdir DIR \
      --config.init_from=moco_v2.npz     # a MoCo checkpoint through bitune-convert
      a baseline of the Bi-tuning paper (Table 3: ResNet-50 pre-trained by MoCo,
      CUB-200-2011, 25%).

Loss `CE + trade_off * InfoNCE` (trade_off 1, tau 0.07 as Bi-tuning's losses), a FIFO
queue of 1024 negatives, a momentum key encoder (m = 0.999), a projector of width 128
(`gpt_star.projector_dim`, Bi-tuning's default). The paper gives no GPT*-specific
values; these follow its Bi-tuning settings.

Overrides: --config.gpt_star.queue_size=4096, --config.gpt_star.trade_off=0.5, ...
"""

import ml_collections

from bitune_jax.training import config_base


def get_config(arg="demo"):
  config = config_base.base_config(arg, "gpt_star")
  config.gpt_star = ml_collections.ConfigDict(dict(
      queue_size=1024, projector_dim=128, temperature=0.07, trade_off=1.0,
      ema_momentum=0.999))
  return config
