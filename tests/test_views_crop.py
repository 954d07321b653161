"""`bitune_jax.data.views.crop` (torchvision's RandomResizedCrop rule, PIL's bilinear
resize of the cropped box, the evaluation view), against independent NumPy / PIL
references (`view_references` states the tolerances), on fresh random inputs (the
`rng` fixture prints its seed on failure)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax.data import pipeline
from bitune_jax.data.views import crop as views_crop
from view_references import (MEAN, NORM_TOL, RESIZE_TOL, RGB_MAX_TOL, RGB_MEAN_TOL,
                             STD, assert_means_close, check_bounds, normalise, pil_float,
                             pil_rgb, ref_box, ref_fallback)


@functools.partial(jax.jit, static_argnames=("n", "scale"))
def _jax_boxes(key, height, width, *, n, scale=(0.08, 1.0)):
  """`[n, 4]` (top, left, h, w) of `n` keys; `height`, `width` traced."""
  boxes = jax.vmap(
      lambda k: jnp.stack(views_crop.crop_box(k, height, width, scale=scale)))
  return boxes(jax.random.split(key, n))


@pytest.mark.parametrize("height,width", [(256, 256), (40, 300), (300, 20), (200, 120)])
def test_crop_box_matches_torchvision_rule(rng, height, width):
  """4000 boxes (traced height / width) are inside the image and their h, w, top,
  left and fallback frequency match a NumPy Monte Carlo of torchvision's rule
  (40 x 300 falls back ~52% of the time, 300 x 20 ~98%)."""
  n = 4000
  key = jax.random.key(int(rng.integers(2**31)))
  ours = np.asarray(_jax_boxes(key, jnp.int32(height), jnp.int32(width), n=n))
  assert ours.dtype == np.int32 and ours.shape == (n, 4)
  check_bounds(ours, height, width)
  draws = [ref_box(rng, height, width) for _ in range(n)]
  ref = np.array([d[:4] for d in draws])
  check_bounds(ref, height, width)
  # The fallback box is one fixed box; a random box equal to it is (nearly) as rare in
  # both samples, so "equals the fallback box" estimates the same frequency for both.
  fallback = np.array(ref_fallback(height, width))
  ours_fb = (ours == fallback).all(1)
  ref_fb = (ref == fallback).all(1)
  assert abs(ref_fb.mean() - np.mean([d[4] for d in draws])) < 0.01
  if not 0.5 <= width / height <= 2:
    assert ref_fb.mean() > 0.2  # the fallback is exercised (~52% and ~98%)
  for i, name in enumerate(["top", "left", "h", "w"]):
    assert_means_close(ours[:, i], ref[:, i], name)
  assert_means_close(ours_fb, ref_fb, "fallback frequency")


@pytest.mark.parametrize("height,width", [(256, 256), (40, 300), (300, 20), (256, 300),
                                          (37, 37), (101, 60)])
def test_crop_box_fallback_is_torchvision_centre_crop(rng, height, width):
  """With an area range that no candidate can fit, every key gives torchvision's centre
  crop, exactly, for static and traced height / width."""
  expected = np.array(ref_fallback(height, width))
  key = jax.random.key(int(rng.integers(2**31)))
  traced = np.asarray(_jax_boxes(key, jnp.int32(height), jnp.int32(width), n=50,
                                 scale=(1.5, 2.0)))
  np.testing.assert_array_equal(traced, np.broadcast_to(expected, traced.shape))
  static = views_crop.crop_box(key, height, width, scale=(1.5, 2.0))
  np.testing.assert_array_equal(np.array(static), expected)


_crop_and_resize = jax.jit(views_crop.crop_and_resize, static_argnames="size")


@pytest.mark.parametrize("side,size,boxes", [
    (256, 224, "any"), (256, 224, "small"), (256, 32, "large"), (37, 32, "any")])
def test_crop_and_resize_matches_pil(rng, side, size, boxes):
  """Random boxes of a random uint8 image == PIL's bilinear resize of the cropped box
  (antialiased when shrinking): upscaling ("small": sides 1-40 to 224), shrinking
  ("large": sides 100-256 to 32) and both ("any")."""
  image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
  for _ in range(5):
    if boxes == "small":
      h, w = rng.integers(1, 41, 2)
    elif boxes == "large":
      h, w = rng.integers(100, side + 1, 2)
    else:
      h, w = rng.integers(1, side + 1, 2)
    top, left = rng.integers(0, side - h + 1), rng.integers(0, side - w + 1)
    out = _crop_and_resize(image, top, left, h, w, size=size)
    assert out.shape == (size, size, 3) and out.dtype == jnp.float32
    out = np.asarray(out, np.float64)
    crop = image[top:top + h, left:left + w]
    box = (top, left, h, w)
    np.testing.assert_allclose(out, pil_float(crop, size), atol=RESIZE_TOL, rtol=0,
                               err_msg=str(box))
    diff = np.abs(out - pil_rgb(crop, size))
    assert diff.max() <= RGB_MAX_TOL, (box, diff.max() * 255)
    assert diff.mean() <= RGB_MEAN_TOL, (box, diff.mean() * 255)


def test_crop_and_resize_whole_image_at_its_size_is_the_image(rng):
  image = rng.integers(0, 256, (37, 37, 3), dtype=np.uint8)
  out = _crop_and_resize(image, 0, 0, 37, 37, size=37)
  np.testing.assert_allclose(np.asarray(out), image / 255.0, atol=1e-7, rtol=0)


@pytest.mark.parametrize("side,size", [(256, 224), (37, 32), (36, 32)])
def test_eval_view_is_the_normalised_centre_crop(rng, side, size):
  image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
  out = jax.jit(views_crop.eval_view, static_argnames="size")(image, size=size)
  assert out.shape == (size, size, 3) and out.dtype == jnp.float32
  offset = (side - size) // 2
  expected = normalise(image[offset:offset + size, offset:offset + size] / 255.0)
  np.testing.assert_allclose(np.asarray(out), expected, atol=NORM_TOL, rtol=0)


def test_normalisation_constants_are_those_of_the_host_views():
  """The ImageNet mean and std, defined once: the host's evaluation batches
  (`pipeline.eval_view`) take the views' constants."""
  assert pipeline.MEAN_RGB is views_crop.MEAN_RGB
  assert pipeline.STD_RGB is views_crop.STD_RGB
  np.testing.assert_allclose(views_crop.MEAN_RGB, MEAN)
  np.testing.assert_allclose(views_crop.STD_RGB, STD)
