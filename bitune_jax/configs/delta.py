"""DELTA: cross-entropy + attention-weighted feature-map distance to the pre-trained
network at the outputs of the backbone stages (Li et al., ICLR 2019).

  bitune-train --config configs/delta.py:demo --workdir /tmp/delta-demo
      offline: the digits transfer of the quick start (pre-train on 0-4, fine-tune 5-9).
  bitune-train --config configs/delta.py:cub,resnet50,25 --workdir DIR \
      --config.init_from=resnet50.npz    # a bitune-convert output
      a competitor of the Bi-tuning and Co-Tuning papers (their Tables 1-3).

Penalty `alpha * sum_s sum_c W_sc ||FM_sc - FM*_sc||^2 + beta/2 ||w_head||^2` with the
channel attention W computed before training (`bitune_jax.methods.delta`). alpha =
beta = 0.01 (DELTA chooses them by cross-validation; the papers that compare with it
do not give theirs). The penalty replaces weight decay, which is set to 0 here.

Overrides: --config.delta.alpha=0.1, --config.delta.attention_batches=16, ...
"""

import ml_collections

from bitune_jax import config_base


def get_config(arg="demo"):
  config = config_base.base_config(arg, "delta")
  config.delta = ml_collections.ConfigDict(dict(
      alpha=0.01, beta=0.01,
      attention_batches=8,  # training batches (of eval_batch_size) for the attention
      attention_temperature=1.0,  # of the softmax over each stage's loss increases
      attention_l2=1.0))  # the ridge of the classifier fitted for the attention
  config.weight_decay = 0.0  # the DELTA penalty is the regulariser
  return config
