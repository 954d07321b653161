"""Bi-tuning (CE + CCE + CCL with per-class key queues and a momentum key encoder).

  bitune-train --config configs/bituning.py:demo --workdir /tmp/bitune-demo
      offline: pre-trains a small ResNet on digits 0-4, then Bi-tunes on digits 5-9 at
      a 25% sampling rate (a few minutes on 2 CPU cores; prints the test accuracy).
  bitune-train --config configs/bituning.py:cub,resnet50,25 --workdir DIR \
      --config.init_from=resnet50.npz    # a bitune-convert output
      the paper's setting (Table 1: CUB-200-2011, ResNet-50, 25% of the training data).

Overrides: --config.total_steps=N, --config.bituning.queue_size=K, ...
"""

import ml_collections

from bitune_jax.training import config_base


def get_config(arg="demo"):
  config = config_base.base_config(arg, "bituning")
  config.bituning = ml_collections.ConfigDict(dict(
      queue_size=config_base.queue_size_for_rate(config.sampling_rate), projector_dim=128,
      temperature=0.07, trade_off=1.0, ema_momentum=0.999, ema_cosine=False,
      cce_after_enqueue=True,
      # The loss: ce_weight * CE + trade_off * (cce_weight * CCE + ccl_weight * CCL); a
      # term of weight 0 is not computed (Table 5's ablations).
      ce_weight=1.0, cce_weight=1.0, ccl_weight=1.0,
      # key_generation: 'momentum' (a momentum key encoder fills per-class queues; the
      # paper's default) or 'memory_bank' (a snapshot of h and z per training example,
      # updated with momentum bank_momentum, K keys per class drawn from it; Appendix
      # B.2). (Not `keys`: a ConfigDict's `.keys` is its method.)
      key_generation="momentum", bank_momentum=0.5))
  return config
