"""Flax backbones (NHWC) and heads: ResNets and DenseNet-121 with torchvision's structure
and names, Vision Transformers in the layout of timm, CLIP and DINOv2 (`vit`).

`create_backbone(arch)` returns a module whose
`apply({"params": ..., "batch_stats": ...}, images, train=False)` gives pooled features
`[B, F]`; with `train=True` pass `mutable=["batch_stats"]`. ViTs have no `batch_stats`
(an empty collection) and take a `dropout` rng for drop-path in training.
"""

import jax.numpy as jnp

from bitune_jax.models import densenet, resnet, vit
from bitune_jax.models.heads import HEAD_INITS, Classifier, Projector

ARCHS = (tuple(resnet.STAGES) + tuple(resnet.WIDE) + ("densenet121",)
         + tuple(resnet.SMALL) + tuple(vit.VARIANTS))

__all__ = ["ARCHS", "HEAD_INITS", "Classifier", "Projector", "create_backbone",
           "is_vit", "num_features"]


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
  if arch in vit.VARIANTS:
    return vit.ViT(**vit.VARIANTS[arch], dtype=dtype, **module_kwargs)
  if arch in resnet.SMALL or arch in resnet.WIDE:
    kwargs = resnet.SMALL.get(arch) or resnet.WIDE[arch]
    return resnet.ResNet(**kwargs, dtype=dtype, **module_kwargs)
  raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")


def num_features(arch):
  """F, the width of the pooled features of `arch`."""
  return create_backbone(arch).num_features


def is_vit(arch):
  """Whether `arch` is a Vision Transformer (no BatchNorm; drop-path; token stages)."""
  return arch in vit.VARIANTS
