"""Building blocks shared by the backbones: PyTorch-compatible conv, BatchNorm, pooling.

Paddings are explicit (Flax's 'SAME' is not PyTorch's padding at stride 2), BatchNorm
uses torchvision's conventions (Flax momentum 0.9 = 1 - torch momentum 0.1, epsilon
1e-5), parameters are float32 and activations take `dtype` (bf16 where asked).
"""

import flax.linen as nn
import jax.numpy as jnp

# torchvision initialises convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features, kernel, *, stride=1, padding=0, dtype=jnp.float32, name=None):
  """A bias-free `kernel x kernel` conv with PyTorch's symmetric zero padding."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=False,
                 dtype=dtype, param_dtype=jnp.float32, kernel_init=conv_init, name=name)


def batch_norm(train, *, dtype=jnp.float32, name=None):
  """BatchNorm with torchvision's statistics conventions.

  In training mode the statistics are those of the whole (global, sharded) batch under
  `jit`; the running variance is updated with the biased batch variance (PyTorch uses
  the unbiased one: a factor n/(n-1) on the running estimate, irrelevant to training).
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


def max_pool_3x3_s2(x):
  """PyTorch `MaxPool2d(3, stride=2, padding=1)` (pads with -inf)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def global_avg_pool(x):
  """`[B, H, W, C] -> [B, C]` in float32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
