"""DELTA: cross-entropy + attention-weighted feature-map distance to the pre-trained
network at the outputs of the backbone stages (Li et al., ICLR 2019).

  bitune-train --config configs/delta.py:demo --workdir /tmp/delta-demo
      offline: the digits transfer of the quick start (pre-train on 0-4, fine-tune 5-9).
  bitune-train --config configs/delta.py:cub,resnet50,25 --workdir DIR \
      --config.init_from=resnet50.npz    # a bitune-convert output
      a competitor of the Bi-tuning and Co-Tuning papers (their Tables 1-3).

What is computed is TLlib's DELTA (the one the Bi-tuning and Co-Tuning papers report):
`CE + alpha * sum_s 0.5 C_s/(H_s W_s) sum_{b,c} W_sc ||FM_sc - FM*_sc||^2 + beta/2
||w_head||^2` on the output of each stage's last conv before its BatchNorm
(`feature_maps="last_conv"`), with the channel attention `W_s = softmax(zscore(D_s) /
5)` measured before training from the loss increase D of a classifier on the frozen
features when a channel is zeroed, over 10 random batches of 32 training images
(`bitune_jax.methods.delta`). alpha = beta = 0.01, TLlib's defaults (DELTA chooses them
by cross-validation; the papers that compare with it do not give theirs). The penalty
replaces weight decay, which is set to 0 here, as in TLlib.

Overrides: --config.delta.alpha=0.1, --config.delta.feature_maps=stage_output,
--config.delta.attention_batches=16, ...
"""

import ml_collections

from bitune_jax import models
from bitune_jax.training import config_base


def get_config(arg="demo"):
  config = config_base.base_config(arg, "delta")
  config.delta = ml_collections.ConfigDict(dict(
      alpha=0.01, beta=0.01,
      # 'last_conv' (TLlib): each stage's last conv output before its BatchNorm;
      # 'stage_output': each stage's output after the residual add and ReLU.
      # A ViT's: its blocks' outputs at the end of each quarter of its depth.
      feature_maps="stage_output" if models.is_vit(config.arch) else "last_conv",
      attention_batches=10,  # random training batches for the attention (TLlib: 10)
      attention_batch_size=32,  # of attention_batch_size images (TLlib: 32)
      attention_temperature=5.0,  # of the softmax over each map's z-scored increases
      attention_l2=1.0))  # the ridge of the classifier fitted for the attention
  config.weight_decay = 0.0  # the DELTA penalty is the regulariser
  return config
