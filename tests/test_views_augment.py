"""`bitune_jax.data.views.augment` (the reference view's flip and jitter, MoCo v2's
views), against independent NumPy / PIL references (`view_references` states the
tolerances), on fresh random inputs (the `rng` fixture prints its seed on failure)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax.data.views import augment
from bitune_jax.data.views import colour
from bitune_jax.data.views import crop as views_crop
from view_references import (BLUR_TOL, CROSS_TOL, MOCO_TOL, RESIZE_TOL, SIDE,
                             SIGMAS, SIZE, STD, assert_means_close, check_bounds,
                             normalise, np_adjust, np_blur, np_gray, np_map_box,
                             pil_float, ref_box, unnormalise)


_crop_and_resize = jax.jit(views_crop.crop_and_resize, static_argnames="size")


def test_flip_half_of_the_time_and_a_mirror_of_the_unflipped_view(rng):
  """A square image with an area range no candidate fits: the crop is always the whole
  image, so each view is the resized image or its mirror; about half are mirrored."""
  n = 2000
  image = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), n)
  outs = jax.jit(jax.vmap(lambda k: augment.reference_train_view(
      image, k, size=SIZE, scale=(1.5, 2.0))))(keys)
  outs = np.asarray(outs, np.float64)
  unflipped = normalise(pil_float(image, SIZE))
  mirrored = unflipped[:, ::-1]
  assert not np.allclose(unflipped, mirrored, atol=0.1)
  is_plain = np.abs(outs - unflipped).max(axis=(1, 2, 3)) <= RESIZE_TOL / STD.min()
  is_mirror = np.abs(outs - mirrored).max(axis=(1, 2, 3)) <= RESIZE_TOL / STD.min()
  assert (is_plain ^ is_mirror).all()
  # The flip mirrors the resized view exactly (up to float rounding).
  plain = np.asarray(views_crop.normalize(
      _crop_and_resize(image, 0, 0, SIDE, SIDE, size=SIZE)))
  np.testing.assert_allclose(outs[is_mirror], np.broadcast_to(
      plain[:, ::-1], outs[is_mirror].shape), atol=CROSS_TOL, rtol=0)
  np.testing.assert_allclose(outs[is_plain], np.broadcast_to(
      plain, outs[is_plain].shape), atol=CROSS_TOL, rtol=0)
  assert abs(is_mirror.mean() - 0.5) <= SIGMAS * math.sqrt(0.25 / n), is_mirror.mean()


def test_reference_view_without_flip_never_flips(rng):
  """The whole image as the box (nothing fits the area range): with flip=False all 400
  views are the resized image itself, none its mirror."""
  n = 400
  image = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), n)
  outs = jax.jit(jax.vmap(lambda k: augment.reference_train_view(
      image, k, size=SIZE, scale=(1.5, 2.0), flip=False)))(keys)
  plain = normalise(pil_float(image, SIZE))
  assert np.abs(np.asarray(outs, np.float64) - plain).max() <= RESIZE_TOL / STD.min()


def test_reference_view_jitter_is_jitter_of_the_plain_view(rng):
  """jitter=(b, c, s, h): the same crop and flip as without jitter, then
  `adjust_colour` (float64 reference) of the draws of `jax.random.fold_in(key, 2)`."""
  strength = (0.4, 0.3, 0.2, 0.1)
  image = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
  view = jax.jit(augment.reference_train_view, static_argnames=("size", "jitter"))
  for seed in rng.integers(2**31, size=6):
    key = jax.random.key(int(seed))
    plain = unnormalise(view(image, key, size=SIZE))
    jittered = np.asarray(view(image, key, size=SIZE, jitter=strength), np.float64)
    factors, order = colour.jitter_draws(jax.random.fold_in(key, 2), strength)
    expected = normalise(np_adjust(plain, factors, order))
    np.testing.assert_allclose(jittered, expected, atol=MOCO_TOL, rtol=0)


@functools.partial(jax.jit, static_argnames=("side", "scale"))
def _moco_boxes(keys, hw, *, side, scale=(0.2, 1.0)):
  return jax.vmap(lambda k: augment.moco_box(k, hw, side, scale=scale))(keys)


@pytest.mark.parametrize("hw,side", [((375, 500), 384), ((500, 333), 37),
                                     ((600, 900), 37), ((60, 50), 384)])
def test_moco_box_area_aspect_and_mapping(rng, hw, side):
  """4000 boxes: in the original, area fraction in [0.2, 1] and aspect w / h in
  [3/4, 4/3] (up to the rounding of w and h to pixels), h, w, top, left distributed as
  torchvision's rule with scale (0.2, 1); on the cache, the box mapped by NumPy."""
  n = 4000
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), n)
  original, cache = _moco_boxes(keys, jnp.asarray(hw, jnp.int32), side=side)
  original, cache = np.asarray(original), np.asarray(cache)
  assert original.dtype == np.int32 and cache.dtype == np.int32
  check_bounds(original, *hw)
  check_bounds(cache, side, side)
  top, left, h, w = original.T.astype(np.float64)
  area = hw[0] * hw[1]
  assert ((h + 0.5) * (w + 0.5) >= 0.2 * area).all(), (h * w / area).min()
  assert ((h - 0.5) * (w - 0.5) <= area).all()
  assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all()
  assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
  ref = np.array([ref_box(rng, *hw, scale=(0.2, 1.0))[:4] for _ in range(n)])
  for i, name in enumerate(["top", "left", "h", "w"]):
    assert_means_close(original[:, i], ref[:, i], name)
  for b in range(0, n, 7):
    assert tuple(cache[b]) == np_map_box(original[b], hw, side), (original[b], hw)


SIZE_M = 32  # MoCo view side in the tests (3 blur taps; 64 below: 7)


@functools.partial(jax.jit, static_argnames=(
    "size", "scale", "jitter", "jitter_p", "grayscale_p", "blur_p", "blur_sigma"))
def _moco(image, hw, keys, **options):
  """`moco_view` of one image with each of `keys` `[n]`: `[n, size, size, 3]`."""
  return jax.vmap(lambda key: augment.moco_view(image, hw, key, **options))(keys)


def test_moco_view_without_colour_or_blur_is_the_mapped_crop(rng):
  """jitter_p = grayscale_p = blur_p = 0: each view is PIL's resize of the cache's
  crop at the box mapped from the original (crop key: `jax.random.split(key, 7)[0]`),
  or its mirror; both occur."""
  n = 24
  side, hw = 48, (int(rng.integers(100, 700)), int(rng.integers(100, 700)))
  image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), n)
  outs = _moco(image, jnp.asarray(hw, jnp.int32), keys, size=SIZE_M, jitter_p=0.0,
               grayscale_p=0.0, blur_p=0.0)
  assert outs.shape == (n, SIZE_M, SIZE_M, 3) and outs.dtype == jnp.float32
  outs = unnormalise(outs)
  crop_keys = jax.vmap(lambda k: jax.random.split(k, 7)[0])(keys)
  originals = _moco_boxes(crop_keys, jnp.asarray(hw, jnp.int32), side=side)[0]
  originals = np.asarray(originals)
  flips = []
  for b in range(n):
    top, left, h, w = np_map_box(originals[b], hw, side)
    plain = pil_float(image[top:top + h, left:left + w], SIZE_M)
    error_plain = np.abs(outs[b] - plain).max()
    error_mirror = np.abs(outs[b] - plain[:, ::-1]).max()
    assert min(error_plain, error_mirror) <= RESIZE_TOL, (b, error_plain, error_mirror)
    flips.append(error_mirror < error_plain)
  assert 0 < sum(flips) < n


def test_moco_view_grayscale_frequency(rng):
  """Default probabilities, 2000 views: grayscale (all channels equal) ~ 0.2 of them,
  within 5 binomial standard errors; jittered or not, the others are in colour."""
  n = 2000
  image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), n)
  outs = unnormalise(_moco(image, jnp.asarray([300, 400], jnp.int32), keys,
                            size=SIZE_M))
  spread = (outs.max(-1) - outs.min(-1)).max(axis=(1, 2))
  grey = spread <= 1e-5
  assert (grey | (spread > 1e-3)).all(), np.sort(spread)[:5]
  assert abs(grey.mean() - 0.2) <= SIGMAS * math.sqrt(0.2 * 0.8 / n), grey.mean()


def test_moco_view_blur_and_flip_frequencies_and_pixels(rng):
  """The whole square image as the box (an area range nothing fits: the fallback),
  no jitter or grayscale, sigma fixed at 1.5: every view is the resized image, blurred
  or not (SciPy reference, `max(3, int(0.1 * size) // 2 * 2 + 1)` taps), mirrored or
  not; each ~ half of 2000 views, within 5 binomial standard errors."""
  n, size = 2000, 64
  side = 48
  image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), n)
  outs = unnormalise(_moco(image, jnp.asarray([300, 300], jnp.int32), keys, size=size,
                            scale=(1.5, 2.0), jitter_p=0.0, grayscale_p=0.0,
                            blur_sigma=(1.5, 1.5)))
  plain = pil_float(image, size)
  blurred = np_blur(plain, np.float32(1.5), max(3, int(0.1 * size) // 2 * 2 + 1))
  candidates = np.stack([plain, plain[:, ::-1], blurred, blurred[:, ::-1]])
  errors = np.abs(outs[:, None] - candidates[None]).max(axis=(2, 3, 4))  # [n, 4]
  kind = errors.argmin(1)
  assert (errors.min(1) <= RESIZE_TOL + BLUR_TOL).all(), errors.min(1).max()
  assert (np.sort(errors, 1)[:, 1] > 0.01).all()  # the four are far apart
  flip, blur = kind % 2 == 1, kind >= 2
  for what, hits in (("flip", flip), ("blur", blur)):
    assert abs(hits.mean() - 0.5) <= SIGMAS * math.sqrt(0.25 / n), (what, hits.mean())


def test_moco_view_is_the_numpy_composition_of_its_draws(rng):
  """Default options: each view == the NumPy pipeline (PIL resize of the mapped box;
  jitter p 0.8; grayscale p 0.2; blur p 0.5, sigma U(0.1, 2); flip p 0.5;
  normalisation) given the draws of the documented keys `jax.random.split(key, 7)`:
  crop, jitter or not, jitter draws, grayscale or not, sigma, blur or not, flip or not
  (yes / no: `jax.random.bernoulli`)."""
  n, side, size = 24, 48, SIZE_M
  hw = (int(rng.integers(100, 700)), int(rng.integers(100, 700)))
  image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), n)
  outs = _moco(image, jnp.asarray(hw, jnp.int32), keys, size=size)
  outs = np.asarray(outs, np.float64)
  taps = max(3, int(0.1 * size) // 2 * 2 + 1)
  for b in range(n):
    k = jax.random.split(keys[b], 7)
    chance = [bool(jax.random.bernoulli(k[i], p)) for i, p in ((1, 0.8), (3, 0.2),
                                                              (5, 0.5), (6, 0.5))]
    original = np.asarray(augment.moco_box(k[0], jnp.asarray(hw, jnp.int32), side)[0])
    top, left, h, w = np_map_box(original, hw, side)
    x = pil_float(image[top:top + h, left:left + w], size)
    if chance[0]:
      x = np_adjust(x, *colour.jitter_draws(k[2], (0.4, 0.4, 0.4, 0.1)))
    if chance[1]:
      x = np.repeat(np_gray(x), 3, -1)
    if chance[2]:
      x = np_blur(x, float(jax.random.uniform(k[4], (), jnp.float32, 0.1, 2.0)), taps)
    if chance[3]:
      x = x[:, ::-1]
    np.testing.assert_allclose(outs[b], normalise(x), atol=MOCO_TOL, rtol=0,
                               err_msg=f"view {b}: {chance}")
