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
  """Projector `[B, F] -> [B, dim]`: one Dense (Bi-tuning, MoCo v1) or MoCo v2's MLP
  `F -> hidden -> dim` with a ReLU between (`hidden_dim=F`). Not normalised here."""
  dim: int = 128
  hidden_dim: Optional[int] = None
  dtype: Any = jnp.float32
  head_init: str = "torch"

  @nn.compact
  def __call__(self, features):
    x = features
    if self.hidden_dim:
      x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=jnp.float32,
                           name="hidden", **dense_inits(self.head_init, x.shape[-1]))(x))
    x = nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32, name="out",
                 **dense_inits(self.head_init, x.shape[-1]))(x)
    return x.astype(jnp.float32)
