"""Bi-tuning (CE + CCE + CCL with per-class key queues and a momentum key encoder).

  bitune-train --config configs/bituning.py:demo --workdir /tmp/bitune-demo
      offline: pre-trains a small ResNet on digits 0-4, then Bi-tunes on digits 5-9 at
      a 25% sampling rate (a few minutes on 2 CPU cores; prints the test accuracy).
  bitune-train --config configs/bituning.py:cub,resnet50,25 --workdir DIR \
      --config.init_from=resnet50.npz    # a bitune-convert output
      the paper's setting (Table 1: CUB-200-2011, ResNet-50, 25% of the training data).

Overrides: --config.total_steps=N, --config.bituning.queue_size=K, ...
"""

from bitune_jax import config_base


def get_config(arg="demo"):
  return config_base.base_config(arg, "bituning")
