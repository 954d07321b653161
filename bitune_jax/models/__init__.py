"""Flax backbones (NHWC) with torchvision's structure and names, and heads.

`create_backbone(arch)` returns a module whose
`apply({"params": ..., "batch_stats": ...}, images, train=False)` gives pooled features
`[B, F]`; with `train=True` pass `mutable=["batch_stats"]`.
"""

import jax.numpy as jnp

from bitune_jax.models import densenet, resnet
from bitune_jax.models.heads import HEAD_INITS, Classifier, Projector

ARCHS = (tuple(resnet.STAGES) + tuple(resnet.WIDE) + ("densenet121",)
         + tuple(resnet.SMALL))

__all__ = ["ARCHS", "HEAD_INITS", "Classifier", "Projector", "create_backbone",
           "num_features"]


def create_backbone(arch, *, dtype=jnp.float32, **module_kwargs):
  """The backbone called `arch` (one of `ARCHS`); `dtype` is the activation dtype
  (e.g. `jnp.bfloat16`); parameters and BatchNorm statistics stay float32.
  `module_kwargs` (e.g. `name`) go to the Flax module."""
  if arch in resnet.STAGES:
    stage_sizes, block = resnet.STAGES[arch]
    return resnet.ResNet(stage_sizes=stage_sizes, block=block, dtype=dtype,
                         **module_kwargs)
  if arch == "densenet121":
    return densenet.DenseNet(dtype=dtype, **module_kwargs)
  if arch in resnet.SMALL or arch in resnet.WIDE:
    kwargs = resnet.SMALL.get(arch) or resnet.WIDE[arch]
    return resnet.ResNet(**kwargs, dtype=dtype, **module_kwargs)
  raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")


def num_features(arch):
  """F, the width of the pooled features of `arch`."""
  return create_backbone(arch).num_features
