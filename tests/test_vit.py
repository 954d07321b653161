"""models/vit.py: the position grid's bicubic resize against PyTorch's `F.interpolate`,
drop-path, the stages DELTA reads, bf16 activations, and the analytic FLOP count against
the FLOPs of the forward's program. (Parity with each source's PyTorch model:
test_convert_vit.py.)"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitune_jax import models
from bitune_jax.models import vit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import device_phases  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.mark.parametrize("size,out,scale", [
    (37, (16, 16), (16.1 / 37, 16.1 / 37)),  # DINOv2's 518-px grid at 224 px
    (37, (24, 24), (24.1 / 37, 24.1 / 37)),
    (5, (7, 3), (7.1 / 5, 3.1 / 5)),
    (14, (24, 24), None),  # timm's resize to a size (384 px)
    (14, (9, 20), None),
    (4, (4, 4), (1.0, 1.0)),
])
def test_bicubic_resize_is_pytorchs(size, out, scale, rng):
  """`resize_bicubic` against `F.interpolate(mode="bicubic", align_corners=False)` on a
  random grid: with a size (the sizes' ratio maps), and with DINOv2's scale factors
  (the factor maps: (g' + 0.1) / g). `jax.image.resize` is not this (a = -0.5, and it
  maps with the sizes' ratio)."""
  grid = rng.standard_normal((size, size, 6)).astype(np.float32)
  nchw = torch.from_numpy(grid.transpose(2, 0, 1)[None])
  if scale:
    expected = F.interpolate(nchw, scale_factor=scale, mode="bicubic", align_corners=False)
  else:
    expected = F.interpolate(nchw, size=out, mode="bicubic", align_corners=False)
  expected = expected[0].numpy().transpose(1, 2, 0)
  assert expected.shape[:2] == out
  got = np.asarray(vit.resize_bicubic(jnp.asarray(grid), out, scale))
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())
  if scale and out[0] != size:  # the factor, not the ratio: another grid
    by_size = np.asarray(vit.resize_bicubic(jnp.asarray(grid), out))
    assert np.abs(by_size - expected).max() > 1e-3


def test_drop_path_zeroes_whole_examples_and_keeps_the_mean(rng):
  y = jnp.asarray(rng.standard_normal((4000, 3, 5)).astype(np.float32)) + 2.0
  out = np.asarray(vit.drop_path(y, 0.25, jax.random.PRNGKey(0)))
  dropped = np.all(out == 0, axis=(1, 2))
  kept = ~dropped
  np.testing.assert_allclose(out[kept], np.asarray(y)[kept] / 0.75, rtol=1e-6)
  assert abs(dropped.mean() - 0.25) < 0.03
  assert abs(out.mean() / float(y.mean()) - 1) < 0.05


def test_drop_path_in_the_model_only_with_its_rng_in_training():
  model = models.create_backbone("vit_demo", drop_path=0.5)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  plain = models.create_backbone("vit_demo").apply(variables, x)
  np.testing.assert_array_equal(model.apply(variables, x), plain)  # eval: no drop
  # In training without a `dropout` rng (a key encoder's forward): nothing dropped.
  np.testing.assert_array_equal(model.apply(variables, x, train=True), plain)
  a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(a, b) and not np.allclose(a, plain)


def test_each_variant_has_its_sources_details():
  """What decides parity at the real sizes, beside the shapes (test_convert_vit.py):
  LayerNorm's epsilon, CLIP's parts, DINOv2's LayerScale and grid offset."""
  for arch, v in vit.VARIANTS.items():
    clip, dinov2 = arch.startswith("clip"), arch.startswith("dinov2")
    assert v["epsilon"] == (1e-5 if clip else 1e-6), arch
    assert v.get("clip", False) == clip and (v.get("proj_dim") == 512) == clip, arch
    assert v.get("layer_scale", False) == dinov2 and v.get("pos_offset", 0) == (
        0.1 if dinov2 else 0), arch
    assert v["patch"] == (14 if dinov2 else 4 if arch == "vit_demo" else 16), arch
  assert float(vit.quick_gelu(jnp.float32(1.0))) == pytest.approx(1 / (1 + np.exp(-1.702)))


def test_stages_are_the_last_block_of_each_quarter():
  assert models.create_backbone("vit_b16").stage_blocks == (2, 5, 8, 11)
  assert models.create_backbone("vit_l16").stage_blocks == (5, 11, 17, 23)
  model = models.create_backbone("vit_demo")
  assert model.stage_blocks == (0, 1, 2, 3)
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  features, stages = model.apply(variables, x, return_stages=True)
  assert sorted(stages) == [f"blocks_{i}" for i in range(4)]
  assert stages["blocks_3"].shape == (2, 1 + 64, 64) and features.shape == (2, 64)
  # Zeroing a channel of the last block's output is zeroing it in what the norm reads.
  scale = jnp.ones(64).at[5].set(0.0)
  _, scaled = model.apply(variables, x, return_stages=True,
                          channel_scale={"blocks_3": scale})
  np.testing.assert_array_equal(scaled["blocks_3"][..., 5], 0.0)


def test_bf16_activations_float32_params_and_features():
  model32 = models.create_backbone("vit_demo")
  model16 = models.create_backbone("vit_demo", dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3)), jnp.float32)
  variables = model32.init(jax.random.PRNGKey(0), x)
  assert {v.dtype for v in jax.tree.leaves(model16.init(jax.random.PRNGKey(0), x))} == {
      jnp.dtype(jnp.float32)}
  f32, f16 = model32.apply(variables, x), model16.apply(variables, x)
  assert f16.dtype == jnp.float32
  error = float(jnp.abs(f16 - f32).max() / jnp.abs(f32).max())
  assert 0 < error < 5e-2, error


@pytest.mark.parametrize("arch,size", [("vit_demo", 32), ("vit_s16", 224),
                                       ("clip_vit_b16", 224), ("dinov2_vit_s14_reg4", 224)])
def test_flops_per_image_is_the_forwards_matmuls(arch, size):
  """The analytic count against the dot products and convolutions of the forward's
  program (traced, not run); DINOv2's at 224 px adds the position grid's resize."""
  model = models.create_backbone(arch)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  traced = device_phases.jaxpr_flops(jax.make_jaxpr(model.apply)(variables, x))
  expected = vit.flops_per_image(arch, size)
  if arch.startswith("dinov2"):  # rows then columns of the resize: 2 einsum contractions
    g, width = 37, model.width
    expected += 2 * (16 * g * g * width + 16 * g * 16 * width)
  assert traced == expected


def test_public_functions_jit_grad_vmap(rng):
  """`resize_bicubic` and `drop_path` as JAX users call them: eager, under `jit` with the
  grid closed over, under `grad` (the resize is linear: its gradient is the weights'
  column sums), under `vmap` over a batch of grids."""
  grid = jnp.asarray(rng.standard_normal((5, 5, 3)).astype(np.float32))
  eager = vit.resize_bicubic(grid, (7, 4), (7.1 / 5, 4.1 / 5))
  closed = jax.jit(lambda: vit.resize_bicubic(grid, (7, 4), (7.1 / 5, 4.1 / 5)))()
  np.testing.assert_allclose(closed, eager, rtol=1e-6, atol=1e-6)
  grad = jax.grad(lambda g: vit.resize_bicubic(g, (7, 4), (7.1 / 5, 4.1 / 5)).sum())(grid)
  rows, cols = vit.cubic_weights(5, 7, 7.1 / 5), vit.cubic_weights(5, 4, 4.1 / 5)
  np.testing.assert_allclose(grad[..., 0], np.outer(rows.sum(0), cols.sum(0)), rtol=1e-5)
  grids = jnp.stack([grid, 2 * grid])
  batched = jax.vmap(lambda g: vit.resize_bicubic(g, (7, 4), (7.1 / 5, 4.1 / 5)))(grids)
  np.testing.assert_allclose(batched[1], 2 * eager, rtol=1e-5, atol=1e-6)
  y = jnp.ones((6, 3))
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(jax.jit(vit.drop_path, static_argnums=1)(y, 0.5, key),
                                vit.drop_path(y, 0.5, key))
  np.testing.assert_array_equal(jax.grad(lambda y: vit.drop_path(y, 0.5, key).sum())(y),
                                vit.drop_path(jnp.ones_like(y), 0.5, key))
  keys = jax.random.split(key, 4)
  assert jax.vmap(lambda k: vit.drop_path(y, 0.5, k))(keys).shape == (4, 6, 3)
