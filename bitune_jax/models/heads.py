"""Heads on pooled features: the classifier and the projector.

New heads start as the reference implementations' do (`head_init`, one of
`HEAD_INITS`):
* "torch": PyTorch's `nn.Linear` default, weights and bias ~ U(-1/sqrt(fan_in),
  1/sqrt(fan_in)) (its kaiming_uniform with a = sqrt(5)): the classifiers of vanilla
  fine-tuning, Co-Tuning, the baselines and unsupervised fine-tuning, and every
  projector;
* "normal_0.01": weights ~ N(0, 0.01^2), bias 0: the Bi-tuning reference's classifier;
* "lecun": Flax's `nn.Dense` default (lecun-normal weights, zero bias).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitune_jax.models import layers

HEAD_INITS = ("torch", "normal_0.01", "lecun")


def dense_inits(init: str, fan_in: int) -> dict[str, Any]:
  """`kernel_init` and `bias_init` of an `nn.Dense` on `fan_in` inputs started as
  `init` (see the module docstring)."""
  if init == "torch":
    bound = 1.0 / max(fan_in, 1) ** 0.5

    def uniform(key, shape, dtype=jnp.float32):
      return jax.random.uniform(key, shape, dtype, -bound, bound)
    return {"kernel_init": uniform, "bias_init": uniform}
  if init == "normal_0.01":
    return {"kernel_init": nn.initializers.normal(0.01),
            "bias_init": nn.initializers.zeros}
  if init == "lecun":
    return {"kernel_init": nn.initializers.lecun_normal(),
            "bias_init": nn.initializers.zeros}
  raise ValueError(f"head init must be one of {', '.join(HEAD_INITS)}, got {init!r}")


class Classifier(nn.Module):
  """Linear classifier `[B, F] -> [B, C]` (logits in float32)."""
  num_classes: int
  dtype: Any = jnp.float32
  head_init: str = "torch"

  @nn.compact
  def __call__(self, features):
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      name="dense", **dense_inits(self.head_init, features.shape[-1]))(
                          features)
    return logits.astype(jnp.float32)


class Projector(nn.Module):
  """Projector `[B, F] -> [B, dim]`, not normalised here:
  * one Dense `out` (Bi-tuning, MoCo v1, InsDisc);
  * an MLP `F -> hidden_dim -> dim`, Dense `hidden`, ReLU, Dense `out` (MoCo v2), with
    `hidden_bn`: a BatchNorm `hidden_bn` before the ReLU (SwAV, DeepCluster-v2, MoCo v3);
    `out_bn`: a BatchNorm `out_bn` after `out` (MoCo v3, whose BatchNorm1d(affine=False)
    the converter stores with scale 1 and bias 0); `use_bias=False`: Dense layers without
    bias (MoCo v3).
  BatchNorm is PyTorch's (`layers.BatchNorm`: `params/<name>/{scale, bias}`,
  `batch_stats/<name>/{mean, var}`); `train=True` (with `mutable=["batch_stats"]`)
  normalises with the batch's statistics. The defaults keep the plain Dense layers."""
  dim: int = 128
  hidden_dim: Optional[int] = None
  dtype: Any = jnp.float32
  head_init: str = "torch"
  use_bias: bool = True
  hidden_bn: bool = False
  out_bn: bool = False

  @nn.compact
  def __call__(self, features, train: bool = False):
    if self.hidden_bn and not self.hidden_dim:
      raise ValueError("Projector: hidden_bn=True needs a hidden layer (hidden_dim)")

    def dense(width, name, x):
      return nn.Dense(width, use_bias=self.use_bias, dtype=self.dtype,
                      param_dtype=jnp.float32, name=name,
                      **dense_inits(self.head_init, x.shape[-1]))(x)

    x = features
    if self.hidden_dim:
      x = dense(self.hidden_dim, "hidden", x)
      if self.hidden_bn:
        x = layers.batch_norm(train, dtype=self.dtype, name="hidden_bn")(x)
      x = nn.relu(x)
    x = dense(self.dim, "out", x)
    if self.out_bn:
      x = layers.batch_norm(train, dtype=self.dtype, name="out_bn")(x)
    return x.astype(jnp.float32)
