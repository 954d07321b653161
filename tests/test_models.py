"""Backbones and heads: shapes, parameter counts, train mode, sharded BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bitune_jax import models

# torchvision's parameter counts minus the final Linear (F * 1000 + 1000).
PARAMS = {"resnet18": 11_689_512 - 513_000, "resnet34": 21_797_672 - 513_000,
          "resnet50": 25_557_032 - 2_049_000, "resnet101": 44_549_160 - 2_049_000,
          "resnet152": 60_192_808 - 2_049_000, "densenet121": 7_978_856 - 1_025_000,
          # 3x3x3x16 stem + BN, stages of 2 BasicBlocks at 16/32/64 (1x1 downsamples).
          "resnet_small": 432 + 32 + 2 * (2 * (2304 + 32)) + (4608 + 64 + 9216 + 64
                                                               + 512 + 64 + 9216 + 64
                                                               + 9216 + 64)
                          + (18432 + 128 + 36864 + 128 + 2048 + 128 + 36864 + 128
                             + 36864 + 128)}


@pytest.mark.parametrize("arch", models.ARCHS)
def test_parameter_counts_and_feature_width(arch):
  model = models.create_backbone(arch)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)))
  assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == PARAMS[arch]
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes,
                       jnp.zeros((2, 64, 64, 3)))
  assert out.shape == (2, models.num_features(arch)) and out.dtype == jnp.float32


def test_train_mode_updates_batch_stats_and_heads():
  model = models.create_backbone("resnet18")
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  features, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  before = variables["batch_stats"]["bn1"]["mean"]
  after = updates["batch_stats"]["bn1"]["mean"]
  assert not np.allclose(before, after)  # momentum 0.9: 10% of the batch mean
  assert features.shape == (4, 512)
  logits = models.Classifier(10).apply(
      models.Classifier(10).init(jax.random.PRNGKey(2), features), features)
  projector = models.Projector(dim=128, hidden_dim=512)
  z = projector.apply(projector.init(jax.random.PRNGKey(3), features), features)
  assert logits.shape == (4, 10) and z.shape == (4, 128)


def test_bf16_activations_keep_float32_params():
  model = models.create_backbone("resnet18", dtype=jnp.bfloat16)
  images = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  assert model.apply(variables, images).dtype == jnp.float32


def test_sharded_batch_gives_global_batchnorm_statistics():
  """Train-mode BN under jit with the batch on 8 devices equals the unsharded result."""
  model = models.create_backbone("resnet18")
  images = jax.random.normal(jax.random.PRNGKey(1), (16, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), images[:1])
  step = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])  # noqa: E731
  plain = jax.jit(step)(variables, images)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded_images = jax.device_put(images, NamedSharding(mesh, P("data")))
  sharded = jax.jit(step)(jax.device_put(variables, NamedSharding(mesh, P())),
                          sharded_images)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded)):
    # Same math; the sharded reductions sum in another order.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-4 * float(np.abs(np.asarray(a)).max()))
