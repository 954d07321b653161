"""DenseNet-121 with torchvision's structure, NHWC.

Variable names mirror torchvision's `features.*` children:
`features.denseblock1.denselayer1.norm1` <-> `denseblock1/denselayer1/norm1`,
`features.transition1.conv` <-> `transition1/conv`, `features.norm5` <-> `norm5`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bitune_jax.models import layers


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv (bn_size * growth) - BN-ReLU-3x3 conv (growth); concatenated."""
  growth_rate: int
  bn_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    y = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="norm1")(x))
    y = layers.conv(self.bn_size * self.growth_rate, 1, dtype=self.dtype, name="conv1")(y)
    y = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="norm2")(y))
    y = layers.conv(self.growth_rate, 3, padding=1, dtype=self.dtype, name="conv2")(y)
    return jnp.concatenate([x, y], axis=-1)


class DenseBlock(nn.Module):
  num_layers: int
  growth_rate: int
  bn_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    for i in range(self.num_layers):
      x = DenseLayer(self.growth_rate, self.bn_size, dtype=self.dtype,
                     name=f"denselayer{i + 1}")(x, train)
    return x


class Transition(nn.Module):
  """BN-ReLU-1x1 conv (halves channels) - 2x2 average pool."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="norm")(x))
    x = layers.conv(self.features, 1, dtype=self.dtype, name="conv")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """Backbone: images `[B, H, W, 3]` -> pooled features `[B, F]` (float32)."""
  block_config: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  bn_size: int = 4
  num_init_features: int = 64
  dtype: Any = jnp.float32

  @property
  def num_features(self):
    channels = self.num_init_features
    for i, n in enumerate(self.block_config):
      channels += n * self.growth_rate
      if i < len(self.block_config) - 1:
        channels //= 2
    return channels

  @nn.compact
  def __call__(self, images, train=False, return_stages=False, channel_scale=None):
    """Pooled features `[B, F]`; with `return_stages`, also the feature maps after each
    dense block: `denseblock<i>` (`denseblock4`: after the final BatchNorm and ReLU)
    and `denseblock<i>_last_conv`, the block's concatenated conv outputs before the
    BatchNorm that reads them (a transition's `norm`, or `norm5`; the same map as
    `denseblock<i>` for i < 4). `channel_scale`: `{map: [C]}` multipliers of those
    maps' channels (DELTA's channel attention)."""
    stages, scale = {}, channel_scale or {}

    def stage(name, x):
      if name in scale:
        x = x * scale[name].astype(x.dtype)
      stages[name] = x
      return x
    x = images.astype(self.dtype)
    x = layers.conv(self.num_init_features, 7, stride=2, padding=3, dtype=self.dtype,
                    name="conv0")(x)
    x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="norm0")(x))
    x = layers.max_pool_3x3_s2(x)
    for i, num_layers in enumerate(self.block_config):
      x = DenseBlock(num_layers, self.growth_rate, self.bn_size, dtype=self.dtype,
                     name=f"denseblock{i + 1}")(x, train)
      x = stage(f"denseblock{i + 1}_last_conv", x)
      if i < len(self.block_config) - 1:
        x = stage(f"denseblock{i + 1}", x)
        x = Transition(x.shape[-1] // 2, dtype=self.dtype,
                       name=f"transition{i + 1}")(x, train)
    x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="norm5")(x))
    x = stage(f"denseblock{len(self.block_config)}", x)
    features = layers.global_avg_pool(x)
    return (features, stages) if return_stages else features
