"""FixMatch's weak and strong views and CutOut (bitune_jax.data.views.weak_strong)
against NumPy references, on fresh random images (the `rng` fixture prints its seed on
failure): smooth colour fields plus noise, uint8.

Tolerances:
* CutOut: the square from the drawn (fraction, centre) is exactly the fill, all else
  exactly the input.
* Frequencies (flip decisions, cutout sides): within 5 standard errors (a false alarm
  about once in 10^6 per comparison).
* Weak views at the cache's size: exactly one of NumPy's 2 x (2 pad + 1)^2 flipped and
  reflect-shifted candidates; from another side, one of those of `crop.crop_and_resize`
  within 1e-5.
* Strong views: the composition of the weak view, `rand_augment` and `cutout` of their
  keys, within 1e-5.
"""

import math

import jax
import numpy as np
import pytest

from bitune_jax.data.views import crop
from bitune_jax.data.views import randaugment
from bitune_jax.data.views import weak_strong as ws
from view_references import MEAN, SIGMAS, STD, unnormalise
from view_references import smooth_noisy_image as _image


# ------------------------------------------------------------------- CutOut


def test_cutout_is_one_square_of_the_drawn_size(rng):
  height, width = 37, 52
  image = rng.uniform(0, 0.4, (height, width, 3)).astype(np.float32)
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 400)
  outs = np.asarray(jax.jit(jax.vmap(lambda k: ws.cutout(image, k)))(keys))
  draws = jax.vmap(lambda k: ws.cutout_draws(k, height, width))(keys)
  sides = []
  for out, fraction, cy, cx in zip(outs, *(np.asarray(x) for x in draws)):
    side = int(np.round(np.float32(fraction) * np.float32(width)))
    top, left = int(cy) - side // 2, int(cx) - side // 2
    square = np.zeros((height, width), bool)
    square[max(top, 0):max(top + side, 0), max(left, 0):max(left + side, 0)] = True
    np.testing.assert_array_equal(out[square], ws.CUTOUT_FILL)
    np.testing.assert_array_equal(out[~square], image[~square])
    assert 0 <= fraction < 0.5 and 0 <= cy < height and 0 <= cx < width
    sides.append(side)
  sides = np.array(sides)
  assert abs(sides.mean() - width / 4) <= SIGMAS * width / 2 / math.sqrt(12 * 400) + 0.5
  assert sides.max() >= 0.45 * width and sides.min() <= 0.05 * width


# -------------------------------------------------------------------- views


def _weak_candidates(planes, pad):
  """Every flip and reflect-shift of float `[H, W, 3]` (FixMatch's pad-and-crop)."""
  size = planes.shape[0]
  out = []
  for image in (planes, planes[:, ::-1]):
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out += [padded[dy:dy + size, dx:dx + size] for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)]
  return np.stack(out)


@pytest.mark.parametrize("side", [32, 40])
def test_weak_view_is_a_flip_and_reflected_shift(rng, side):
  size = 32
  image = _image(rng, side, side)
  if side == size:
    base = image / 255.0
  else:
    base = np.asarray(crop.crop_and_resize(image, 0, 0, side, side, size=size),
                      np.float64)
  candidates = (_weak_candidates(base, 4) - MEAN) / STD  # pad round(0.125 * 32)
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 200)
  weak = jax.jit(jax.vmap(lambda k: ws.weak_view(image, k, size=size)))
  views = np.asarray(weak(keys))
  picks = []
  for view in views:
    err = np.abs(candidates - view).reshape(len(candidates), -1).max(1)
    assert err.min() <= (1e-5 if side == size else 1e-4), err.min()
    picks.append(int(np.argmin(err)))
  flips = np.array(picks) >= 81
  assert abs(flips.mean() - 0.5) <= SIGMAS * math.sqrt(0.25 / 200)
  assert len(set(picks)) > 50  # many of the 162 shifts and flips


def test_strong_view_jit_vmap_deterministic_and_per_key(rng):
  size = 32
  images = np.stack([_image(rng, size, size) for _ in range(6)])
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 6)
  strong = jax.jit(jax.vmap(lambda x, k: ws.strong_view(x, k, size=size)))
  out = np.asarray(strong(images, keys))
  assert out.shape == (6, size, size, 3) and out.dtype == np.float32
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(out, np.asarray(strong(images, keys)))
  single = jax.jit(lambda x, k: ws.strong_view(x, k, size=size))
  for i in range(6):
    np.testing.assert_array_equal(out[i], np.asarray(single(images[i], keys[i])))
  other = np.asarray(strong(images, jax.random.split(jax.random.key(1 + int(
      rng.integers(2**30))), 6)))
  assert all(np.abs(out[i] - other[i]).max() > 0.1 for i in range(6))
  same_image = np.asarray(strong(np.repeat(images[:1], 6, 0), keys))
  assert all(np.abs(same_image[0] - same_image[i]).max() > 0.1 for i in range(1, 6))


def test_strong_view_is_weak_levels_augmented_and_cut(rng):
  """From a cache at the view's size (no resampling): the weak view of key 0 of
  `split(key, 3)`, `rand_augment` with key 1, `cutout` of grey 0.5 with key 2."""
  size = 32
  image = _image(rng, size, size)
  for seed in rng.integers(2**31, size=3):
    key = jax.random.key(int(seed))
    weak_key, augment_key, cutout_key = jax.random.split(key, 3)
    levels = np.round(unnormalise(ws.weak_view(image, weak_key, size=size)) * 255)
    augmented = randaugment.rand_augment(levels, augment_key) / 255
    ref = (np.asarray(ws.cutout(augmented, cutout_key)) - MEAN) / STD
    np.testing.assert_allclose(ws.strong_view(image, key, size=size), ref, atol=1e-5,
                               rtol=0)


def test_strong_view_from_another_side_rounds_the_weak_view(rng):
  """No ops, no CutOut, a cache of 40 for views of 32: the weak view rounded to levels
  (ties of float32 rounding, within 1e-3 of a half level, either way)."""
  size = 32
  image = _image(rng, 40, 40)
  key = jax.random.key(int(rng.integers(2**31)))
  weak = unnormalise(ws.weak_view(image, jax.random.split(key, 3)[0], size=size)) * 255
  plain = ws.strong_view(image, key, size=size, num_ops=0, cutout_fraction=0)
  levels = unnormalise(plain) * 255
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3, rtol=0)
  clear = np.abs(weak - np.floor(weak) - 0.5) > 1e-3
  np.testing.assert_array_equal(np.round(levels)[clear], np.round(weak)[clear])
  assert np.abs(levels - weak).max() <= 0.5 + 1e-3



# -------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
  image = np.zeros((32, 32, 3), np.uint8)
  key = jax.random.key(0)
  cases = [
      (lambda: ws.cutout(image[..., 0], key), r"\[H, W, C\]"),
      (lambda: ws.cutout(image, key, max_fraction=2.0), "max_fraction"),
      (lambda: ws.weak_view(image, key, size=32, shift=1.0), "shift"),
      (lambda: ws.strong_view(image[0], key, size=32), "image_u8"),
      (lambda: ws.strong_view(image, key, size=32, cutout_fraction=-0.1),
       "cutout_fraction"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
