"""Building blocks shared by the backbones: PyTorch-compatible conv, BatchNorm, pooling.

Paddings are explicit (Flax's 'SAME' is not PyTorch's padding at stride 2), BatchNorm
is PyTorch's (momentum 0.1, epsilon 1e-5, the running variance unbiased), parameters
are float32 and activations take `dtype` (bf16 where asked).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision initialises convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features, kernel, *, stride=1, padding=0, dtype=jnp.float32, name=None):
  """A bias-free `kernel x kernel` conv with PyTorch's symmetric zero padding."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=False,
                 dtype=dtype, param_dtype=jnp.float32, kernel_init=conv_init, name=name)


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's (`torch.nn.BatchNorm2d`)
  statistics: in training mode, normalises with the batch's biased variance and
  updates the running variance with the unbiased one (n / (n - 1) times it, n the
  values per channel); `running = momentum * running + (1 - momentum) * batch`.

  Flax's `nn.BatchNorm` keeps the biased variance in its running estimate: a model
  fine-tuned with it evaluates differently from the same model fine-tuned in PyTorch,
  most with small batches and in the late stages (7 x 7 maps: n = 49 B). The variables
  have Flax's names and shapes (`params/{scale, bias}`, `batch_stats/{mean, var}`),
  so checkpoints and converted weights load unchanged. Statistics are computed in
  float32 (two passes: the mean, then the mean squared deviation), whatever the
  activations' dtype; under `jit` on a sharded batch they are the global batch's.
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean",
                                 lambda: jnp.zeros((features,), jnp.float32))
    running_var = self.variable("batch_stats", "var",
                                lambda: jnp.ones((features,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      if not self.is_initializing():
        n = x.size // features
        unbiased = var * (n / max(n - 1, 1))
        running_mean.value = (self.momentum * running_mean.value
                              + (1 - self.momentum) * mean)
        running_var.value = (self.momentum * running_var.value
                             + (1 - self.momentum) * unbiased)
    y = (x32 - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype)


def batch_norm(train, *, dtype=jnp.float32, name=None):
  """`BatchNorm` with torchvision's conventions (Flax momentum 0.9 = 1 - torch momentum
  0.1, epsilon 1e-5; the running variance unbiased): in training mode the statistics
  are those of the whole (global, sharded) batch under `jit`."""
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=dtype, name=name)


def max_pool_3x3_s2(x):
  """PyTorch `MaxPool2d(3, stride=2, padding=1)` (pads with -inf)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def global_avg_pool(x):
  """`[B, H, W, C] -> [B, C]` in float32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
