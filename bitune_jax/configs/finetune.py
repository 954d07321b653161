"""Vanilla fine-tuning (cross-entropy on a new head): the baseline.

  bitune-train --config configs/finetune.py:demo --workdir /tmp/finetune-demo
      the same offline transfer as configs/bituning.py:demo, for comparison.
  bitune-train --config configs/finetune.py:cub,resnet50,25 --workdir DIR \
      --config.init_from=resnet50.npz
"""

from bitune_jax.training import config_base


def get_config(arg="demo"):
  return config_base.base_config(arg, "finetune")
