"""ResNet-18/34/50/101/152 with torchvision's structure (v1.5: stride on the 3x3 conv).

NHWC. Variable names follow torchvision's so that conversion is mechanical:
`layer{i}.{j}.conv1.weight` <-> `layer{i}_{j}/conv1/kernel`,
`layer{i}.{j}.downsample.0/1` <-> `layer{i}_{j}/downsample_conv` / `downsample_bn`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bitune_jax.models import layers


class _Block(nn.Module):
  """A residual block's fields: its width, stride and compute dtype."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32


class BasicBlock(_Block):
  """Two 3x3 convs (ResNet-18/34); the stride is on the first."""
  expansion = 1

  @nn.compact
  def __call__(self, x, train, conv_scale=None):
    """`(output, last conv's output before its BatchNorm)`; `conv_scale` multiplies
    the channels of the latter (see `ResNet`)."""
    y = layers.conv(self.planes, 3, stride=self.stride, padding=1, dtype=self.dtype,
                    name="conv1")(x)
    y = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="bn1")(y))
    y = layers.conv(self.planes, 3, padding=1, dtype=self.dtype, name="conv2")(y)
    return _residual(self, x, y, train, conv_scale, "bn2")


class Bottleneck(_Block):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 x4 (ResNet-50/101/152)."""
  expansion = 4

  @nn.compact
  def __call__(self, x, train, conv_scale=None):
    """`(output, conv3's output before bn3)`; `conv_scale` multiplies the channels of
    the latter (see `ResNet`)."""
    y = layers.conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="bn1")(y))
    y = layers.conv(self.planes, 3, stride=self.stride, padding=1, dtype=self.dtype,
                    name="conv2")(y)
    y = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="bn2")(y))
    y = layers.conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(y)
    return _residual(self, x, y, train, conv_scale, "bn3")


def _residual(block, x, y, train, conv_scale, bn):
  """`(relu(bn(y') + shortcut(x)), y')`, y' the last conv's output `y` scaled."""
  y = _scaled(y, conv_scale)
  out = layers.batch_norm(train, dtype=block.dtype, name=bn)(y)
  return nn.relu(out + _shortcut(block, x, train)), y


def _scaled(x, scale):
  return x if scale is None else x * scale.astype(x.dtype)


def _shortcut(block, x, train):
  """Identity, or torchvision's `downsample` (1x1 strided conv + BN) when shapes change."""
  out = block.planes * block.expansion
  if block.stride == 1 and x.shape[-1] == out:
    return x
  x = layers.conv(out, 1, stride=block.stride, dtype=block.dtype,
                  name="downsample_conv")(x)
  return layers.batch_norm(train, dtype=block.dtype, name="downsample_bn")(x)


class ResNet(nn.Module):
  """Backbone: images `[B, H, W, 3]` -> pooled features `[B, F]` (float32).

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
    block: `BasicBlock` or `Bottleneck`.
    dtype: activation dtype (parameters and BatchNorm statistics stay float32).
    base_width: channels of the first stage (doubling per stage).
    small_inputs: CIFAR-style stem for 32x32 images (3x3 conv, stride 1, no max-pool)
      instead of ImageNet's (7x7 conv, stride 2, 3x3 max-pool).
  """
  stage_sizes: Sequence[int]
  block: Any
  dtype: Any = jnp.float32
  base_width: int = 64
  small_inputs: bool = False

  @property
  def num_features(self):
    return self.base_width * 2 ** (len(self.stage_sizes) - 1) * self.block.expansion

  @nn.compact
  def __call__(self, images, train=False, return_stages=False, channel_scale=None):
    """Pooled features `[B, F]`; with `return_stages`, also the feature maps `{stem,
    layer1, ..., layer1_last_conv, ...}`: `layer<i>` is stage i's output (after the
    residual add and ReLU), `layer<i>_last_conv` the output of the stage's last conv
    (`conv3` of its last bottleneck, `conv2` of its last basic block) before that
    conv's BatchNorm. `channel_scale`: `{map: [C]}` multipliers of those maps' channels
    before the rest of the network reads them (DELTA's channel attention zeroes one;
    zeroing a channel of `layer<i>_last_conv` is zeroing that output channel's row of
    the conv's weight, as TLlib does)."""
    x = images.astype(self.dtype)
    if self.small_inputs:
      x = layers.conv(self.base_width, 3, padding=1, dtype=self.dtype, name="conv1")(x)
      x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="bn1")(x))
    else:
      x = layers.conv(self.base_width, 7, stride=2, padding=3, dtype=self.dtype,
                      name="conv1")(x)
      x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="bn1")(x))
      x = layers.max_pool_3x3_s2(x)
    stages = {"stem": x}
    for i, num_blocks in enumerate(self.stage_sizes):
      stage, scale = f"layer{i + 1}", channel_scale or {}
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x, last_conv = self.block(
            self.base_width * 2 ** i, stride=stride, dtype=self.dtype,
            name=f"{stage}_{j}")(x, train, scale.get(f"{stage}_last_conv")
                                 if j == num_blocks - 1 else None)
      stages[f"{stage}_last_conv"] = last_conv
      stages[stage] = x = _scaled(x, scale.get(stage))
    features = layers.global_avg_pool(x)
    return (features, stages) if return_stages else features


STAGES = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
    "resnet101": ((3, 4, 23, 3), Bottleneck),
    "resnet152": ((3, 8, 36, 3), Bottleneck),
}

# SimCLR v1's wider ResNet-50s: every width (the stem's included) times 2 or 4, as the
# official TF checkpoints and their PyTorch conversion (torchvision names).
WIDE = {"resnet50x2": dict(stage_sizes=(3, 4, 6, 3), block=Bottleneck, base_width=128),
        "resnet50x4": dict(stage_sizes=(3, 4, 6, 3), block=Bottleneck, base_width=256)}

# Sized for 32x32 inputs (the offline demo): CIFAR-style stem, 16/32/64 channels.
SMALL = {"resnet_small": dict(stage_sizes=(2, 2, 2), block=BasicBlock, base_width=16,
                              small_inputs=True)}
