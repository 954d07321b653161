"""Heads on pooled features: the classifier and the projector."""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp


class Classifier(nn.Module):
  """Linear classifier `[B, F] -> [B, C]` (logits in float32)."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features):
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      name="dense")(features)
    return logits.astype(jnp.float32)


class Projector(nn.Module):
  """Projector `[B, F] -> [B, dim]`: one Dense (Bi-tuning, MoCo v1) or MoCo v2's MLP
  `F -> hidden -> dim` with a ReLU between (`hidden_dim=F`). Not normalised here."""
  dim: int = 128
  hidden_dim: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features):
    x = features
    if self.hidden_dim:
      x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=jnp.float32,
                           name="hidden")(x))
    x = nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32, name="out")(x)
    return x.astype(jnp.float32)
