"""Device views (bitune_jax.data.device_views) against independent NumPy / PIL
references of the documented semantics (torchvision's RandomResizedCrop rule, PIL's
bilinear resize of the cropped box), on fresh random inputs (the `rng` fixture prints
its seed on failure).

Tolerances (all absolute):
* Crop-box statistics: 4000 JAX boxes vs a 4000-draw NumPy Monte Carlo; means of h,
  w, top, left and the fallback frequency within 5 standard errors of the difference
  (a false alarm about once in 10^6 per comparison).
* Resizing vs PIL's float mode ("F", per channel, the same triangle filter in float64
  weights): measured up to 2.1e-5 (S = 256, float32 sums over up to 256 pixels),
  so RESIZE_TOL = 1e-4. Vs PIL's usual uint8 "RGB" path (rounded after each pass,
  fixed-point weights): measured max 1.00/255, mean 0.30/255, so RGB_MAX_TOL =
  1.5/255 and RGB_MEAN_TOL = 0.5/255. (PIL's `resize(box=...)` is not the reference:
  its filter reaches pixels outside the box, up to 140/255 apart at the box's edges,
  while torchvision crops first and so only ever sees the box.)
* Normalised outputs vs float64 NumPy: 2e-6 (float32 rounding of values up to ~2.7).
* The same views from different compilations (batch sharded over 8 devices or not,
  one row or 16, vmapped or not): the same boxes and flips, but XLA's float32 sums
  and fusions differ with the shapes: measured up to 1.07e-6 apart (normalised
  units; ~2.4e-7 in [0, 1], a few float32 ulps), so CROSS_TOL = 1e-5. A different
  box or flip is ~1 apart.
* Flip frequency over 2000 keys: within 5 binomial standard errors of 1/2.
* Colour (float32 `adjust_colour`, `grayscale` vs float64 NumPy, hue through
  `colorsys`): measured up to 1.2e-6 (luma 8e-8), so COLOUR_TOL = 1e-5.
* Blur vs SciPy's float64 `convolve1d` (mode "mirror"): measured up to 2.4e-7 (224
  x 224, 23 taps), so BLUR_TOL = 2e-6; SciPy's "reflect" (edge repeated) is > 1e-3
  away.
* MoCo views vs the NumPy composition of their draws, reference views with jitter vs
  the float64 jitter of the plain view, and MoCo views from different compilations
  (8 devices, 1, one row): measured up to 4.5e-6 (normalised units: the jitter's
  factors up to 1.4 and 1 / std amplify float32 rounding), so MOCO_TOL = 3e-5.
* Jitter draws over 20000 keys: means and variances of the factors, and the
  frequency of each op first (1/4), within 5 standard errors. MoCo grayscale (p 0.2),
  blur and flip (p 1/2) frequencies over 2000 keys: within 5 binomial standard errors.
"""

import ast
import colorsys
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image
from scipy import ndimage

from bitune_jax.data import device_views as dv

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
RESIZE_TOL = 1e-4
RGB_MAX_TOL = 1.5 / 255
RGB_MEAN_TOL = 0.5 / 255
NORM_TOL = 2e-6
CROSS_TOL = 1e-5
SIGMAS = 5.0
COLOUR_TOL = 1e-5
BLUR_TOL = 2e-6
MOCO_TOL = 3e-5
RATIO = (3 / 4, 4 / 3)


def _normalise(x):
  return (np.asarray(x, np.float64) - MEAN) / STD


# ------------------------------------------------------------- torchvision's rule


def _ref_fallback(height, width, ratio=RATIO):
  """torchvision's fallback: the whole image, aspect clamped to `ratio`, centred."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _ref_box(rng, height, width, scale=(0.08, 1.0), ratio=RATIO, attempts=10):
  """One draw of torchvision's RandomResizedCrop.get_params, in NumPy and Python
  floats: `(top, left, h, w, fell_back)`."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w, False
  return (*_ref_fallback(height, width, ratio), True)


@functools.partial(jax.jit, static_argnames=("n", "scale"))
def _jax_boxes(key, height, width, *, n, scale=(0.08, 1.0)):
  """`[n, 4]` (top, left, h, w) of `n` keys; `height`, `width` traced."""
  boxes = jax.vmap(lambda k: jnp.stack(dv.crop_box(k, height, width, scale=scale)))
  return boxes(jax.random.split(key, n))


def _check_bounds(boxes, height, width):
  top, left, h, w = boxes.T
  assert (h >= 1).all() and (w >= 1).all()
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()


def _assert_means_close(ours, ref, what):
  """Means of two independent samples within SIGMAS standard errors."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  se = math.sqrt(ours.var() / ours.size + ref.var() / ref.size)
  diff = abs(ours.mean() - ref.mean())
  assert diff <= SIGMAS * se + 1e-9, (what, ours.mean(), ref.mean(), se)


@pytest.mark.parametrize("height,width", [(256, 256), (40, 300), (300, 20), (200, 120)])
def test_crop_box_matches_torchvision_rule(rng, height, width):
  """4000 boxes (traced height / width) are inside the image and their h, w, top,
  left and fallback frequency match a NumPy Monte Carlo of torchvision's rule
  (40 x 300 falls back ~52% of the time, 300 x 20 ~98%)."""
  n = 4000
  key = jax.random.key(int(rng.integers(2**31)))
  ours = np.asarray(_jax_boxes(key, jnp.int32(height), jnp.int32(width), n=n))
  assert ours.dtype == np.int32 and ours.shape == (n, 4)
  _check_bounds(ours, height, width)
  draws = [_ref_box(rng, height, width) for _ in range(n)]
  ref = np.array([d[:4] for d in draws])
  _check_bounds(ref, height, width)
  # The fallback box is one fixed box; a random box equal to it is (nearly) as rare in
  # both samples, so "equals the fallback box" estimates the same frequency for both.
  fallback = np.array(_ref_fallback(height, width))
  ours_fb = (ours == fallback).all(1)
  ref_fb = (ref == fallback).all(1)
  assert abs(ref_fb.mean() - np.mean([d[4] for d in draws])) < 0.01
  if not 0.5 <= width / height <= 2:
    assert ref_fb.mean() > 0.2  # the fallback is exercised (~52% and ~98%)
  for i, name in enumerate(["top", "left", "h", "w"]):
    _assert_means_close(ours[:, i], ref[:, i], name)
  _assert_means_close(ours_fb, ref_fb, "fallback frequency")


@pytest.mark.parametrize("height,width", [(256, 256), (40, 300), (300, 20), (256, 300),
                                          (37, 37), (101, 60)])
def test_crop_box_fallback_is_torchvision_centre_crop(rng, height, width):
  """With an area range that no candidate can fit, every key gives torchvision's centre
  crop, exactly, for static and traced height / width."""
  expected = np.array(_ref_fallback(height, width))
  key = jax.random.key(int(rng.integers(2**31)))
  traced = np.asarray(_jax_boxes(key, jnp.int32(height), jnp.int32(width), n=50,
                                 scale=(1.5, 2.0)))
  np.testing.assert_array_equal(traced, np.broadcast_to(expected, traced.shape))
  static = dv.crop_box(key, height, width, scale=(1.5, 2.0))
  np.testing.assert_array_equal(np.array(static), expected)


# ------------------------------------------------------------------ resampling


_crop_and_resize = jax.jit(dv.crop_and_resize, static_argnames="size")


def _pil_float(crop, size):
  """PIL's bilinear resize of uint8 `crop` in float mode per channel, in [0, 1]."""
  channels = [np.asarray(Image.fromarray(crop[..., c].astype(np.float32), mode="F")
                         .resize((size, size), Image.BILINEAR)) for c in range(3)]
  return np.stack(channels, -1).astype(np.float64) / 255.0


def _pil_rgb(crop, size):
  """PIL's usual uint8 RGB bilinear resize of `crop`, in [0, 1]."""
  return np.asarray(Image.fromarray(np.ascontiguousarray(crop))
                    .resize((size, size), Image.BILINEAR)) / 255.0


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
    np.testing.assert_allclose(out, _pil_float(crop, size), atol=RESIZE_TOL, rtol=0,
                               err_msg=str(box))
    diff = np.abs(out - _pil_rgb(crop, size))
    assert diff.max() <= RGB_MAX_TOL, (box, diff.max() * 255)
    assert diff.mean() <= RGB_MEAN_TOL, (box, diff.mean() * 255)


def test_crop_and_resize_whole_image_at_its_size_is_the_image(rng):
  image = rng.integers(0, 256, (37, 37, 3), dtype=np.uint8)
  out = _crop_and_resize(image, 0, 0, 37, 37, size=37)
  np.testing.assert_allclose(np.asarray(out), image / 255.0, atol=1e-7, rtol=0)


# ------------------------------------------------------------------------ eval


@pytest.mark.parametrize("side,size", [(256, 224), (37, 32), (36, 32)])
def test_eval_view_is_the_normalised_centre_crop(rng, side, size):
  image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
  out = jax.jit(dv.eval_view, static_argnames="size")(image, size=size)
  assert out.shape == (size, size, 3) and out.dtype == jnp.float32
  offset = (side - size) // 2
  expected = _normalise(image[offset:offset + size, offset:offset + size] / 255.0)
  np.testing.assert_allclose(np.asarray(out), expected, atol=NORM_TOL, rtol=0)


def test_normalisation_constants_are_those_of_the_host_views():
  """Same MEAN_RGB / STD_RGB as the host-side modules that define them (pipeline.py's
  evaluation batches; views.py while it exists), read from their source."""
  folder = os.path.dirname(dv.__file__)
  paths = [os.path.join(folder, name) for name in ("pipeline.py", "views.py")]
  paths = [path for path in paths if os.path.exists(path)]
  assert paths
  for path in paths:
    with open(path) as f:
      tree = ast.parse(f.read())
    constants = {
        node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in ("MEAN_RGB", "STD_RGB")}
    assert constants == {"MEAN_RGB": dv.MEAN_RGB, "STD_RGB": dv.STD_RGB}, path
  np.testing.assert_allclose(dv.MEAN_RGB, MEAN)
  np.testing.assert_allclose(dv.STD_RGB, STD)


# ----------------------------------------------------------------- train views

SIDE, SIZE = 37, 32  # eval_resize(32) = 37
_batch_views = jax.jit(dv.batch_views, static_argnames=("view", "size"))


def test_batch_views_same_pixels_on_one_and_eight_devices(rng):
  """The batch sharded over 8 devices == on one device == each row on its own (with its
  global row index): the pixels depend on the global row, not on the shard."""
  batch = 16
  images = rng.integers(0, 256, (batch, SIDE, SIDE, 3), dtype=np.uint8)
  rows = rng.permutation(1000)[:batch].astype(np.int32)
  seed, step = int(rng.integers(2**31)), int(rng.integers(10**6))
  call = functools.partial(_batch_views, seed=seed, step=step, view=1, size=SIZE)
  device = jax.devices()[0]
  single = call(jax.device_put(images, device), rows=jax.device_put(rows, device))
  assert single.shape == (batch, SIZE, SIZE, 3) and single.dtype == jnp.float32
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  sharded = call(jax.device_put(images, sharding), rows=jax.device_put(rows, sharding))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=CROSS_TOL,
                             rtol=0)
  for b in range(batch):
    alone = call(images[b:b + 1], rows=rows[b:b + 1])
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(single[b]),
                               atol=CROSS_TOL, rtol=0, err_msg=f"row {rows[b]}")


def test_views_differ_by_row_step_and_view_and_repeat_for_the_same_ones(rng):
  """One image in every row: rows, steps and view numbers all give different views;
  the same (seed, step, row, view) gives the same view again (a resumed run)."""
  batch = 8
  image = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
  images = np.broadcast_to(image, (batch, SIDE, SIDE, 3))
  rows = np.arange(batch, dtype=np.int32) + int(rng.integers(1000))
  seed, step = int(rng.integers(2**31)), int(rng.integers(10**6))

  def views(step=step, view=0, seed=seed, rows=rows):
    return np.asarray(_batch_views(images, seed=seed, step=step, rows=rows, view=view,
                                   size=SIZE))

  base = views()
  flat = base.reshape(batch, -1)
  for i in range(batch):
    for j in range(i):
      assert not np.array_equal(flat[i], flat[j]), (i, j)
  for other in (views(step=step + 1), views(view=1), views(seed=seed + 1)):
    for b in range(batch):
      assert not np.array_equal(other[b], base[b])
  # The same draws again, also through a fresh compilation and from the single view.
  np.testing.assert_array_equal(views(), base)
  again = jax.jit(dv.batch_views, static_argnames=("view", "size"))(
      images, seed=seed, step=step, rows=rows, view=0, size=SIZE)
  np.testing.assert_allclose(np.asarray(again), base, atol=CROSS_TOL, rtol=0)
  one = dv.reference_train_view(image, dv.view_key(seed, step, rows[3], 0), size=SIZE)
  np.testing.assert_allclose(np.asarray(one), base[3], atol=CROSS_TOL, rtol=0)


def test_flip_half_of_the_time_and_a_mirror_of_the_unflipped_view(rng):
  """A square image with an area range no candidate fits: the crop is always the whole
  image, so each view is the resized image or its mirror; about half are mirrored."""
  n = 2000
  image = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), n)
  outs = jax.jit(jax.vmap(lambda k: dv.reference_train_view(
      image, k, size=SIZE, scale=(1.5, 2.0))))(keys)
  outs = np.asarray(outs, np.float64)
  unflipped = _normalise(_pil_float(image, SIZE))
  mirrored = unflipped[:, ::-1]
  assert not np.allclose(unflipped, mirrored, atol=0.1)
  is_plain = np.abs(outs - unflipped).max(axis=(1, 2, 3)) <= RESIZE_TOL / STD.min()
  is_mirror = np.abs(outs - mirrored).max(axis=(1, 2, 3)) <= RESIZE_TOL / STD.min()
  assert (is_plain ^ is_mirror).all()
  # The flip mirrors the resized view exactly (up to float rounding).
  plain = np.asarray(dv.normalize(_crop_and_resize(image, 0, 0, SIDE, SIDE, size=SIZE)))
  np.testing.assert_allclose(outs[is_mirror], np.broadcast_to(
      plain[:, ::-1], outs[is_mirror].shape), atol=CROSS_TOL, rtol=0)
  np.testing.assert_allclose(outs[is_plain], np.broadcast_to(
      plain, outs[is_plain].shape), atol=CROSS_TOL, rtol=0)
  assert abs(is_mirror.mean() - 0.5) <= SIGMAS * math.sqrt(0.25 / n), is_mirror.mean()


# ---------------------------------------------------------------------- colour


def _np_gray(x):
  """ITU-R 601-2 luma, float64 `[..., 1]`."""
  return (np.asarray(x, np.float64) @ np.array([0.299, 0.587, 0.114]))[..., None]


def _np_hue(x, shift):
  """Hue rotated by `shift` turns, per pixel through the standard library's colorsys."""
  out = np.empty(x.shape, np.float64)
  for index in np.ndindex(x.shape[:-1]):
    h, s, v = colorsys.rgb_to_hsv(*(float(c) for c in x[index]))
    out[index] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  return out


def _np_adjust(x, factors, order):
  """torchvision's ColorJitter semantics given its draws, in float64: brightness,
  contrast (blend with the mean luma), saturation (blend with the luma image), hue,
  in `order`, each clipped to [0, 1]."""
  x = np.asarray(x, np.float64)
  b, c, s, h = (float(f) for f in factors)
  ops = [lambda x: b * x,
         lambda x: c * x + (1 - c) * _np_gray(x).mean(),
         lambda x: s * x + (1 - s) * _np_gray(x),
         lambda x: _np_hue(x, h)]
  for op in order:
    x = np.clip(ops[int(op)](x), 0.0, 1.0)
  return x


def _colour_image(rng, side=12):
  """Random float32 `[side, side, 3]` in [0, 1] with the edge cases of the hue: grey
  pixels, ties of the largest channel, saturated 0 / 1 channels."""
  x = rng.uniform(0, 1, (side, side, 3))
  x[0, :] = rng.uniform(0, 1, (side, 1))  # grey
  x[1, :, 1] = x[1, :, 0]  # r == g
  x[2, :, 2] = x[2, :, 1]  # g == b
  x[3, :, 0] = x[3, :, 2]  # r == b
  x[4] = rng.integers(0, 2, (side, 3))  # black, white and primaries
  return x.astype(np.float32)


_adjust = jax.jit(jax.vmap(dv.adjust_colour))


def test_grayscale_is_itu_601_luma(rng):
  x = rng.uniform(0, 1, (9, 11, 3)).astype(np.float32)
  out = jax.jit(dv.grayscale)(x)
  assert out.shape == (9, 11, 1) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), _np_gray(x), atol=COLOUR_TOL, rtol=0)


@pytest.mark.parametrize("op", [0, 1, 2, 3])
def test_adjust_colour_each_op_alone(rng, op):
  """One op with a random factor (the others at their identity: 1, 1, 1, 0), in a
  random position of the order, == the float64 reference of that op alone; factors
  beyond the jitter ranges too (clipping, negative saturation, hue past a half turn)."""
  n = 6
  images = np.stack([_colour_image(rng) for _ in range(n)])
  factors = np.tile(np.array([1.0, 1.0, 1.0, 0.0], np.float32), (n, 1))
  factors[:, op] = (rng.uniform(-0.6, 0.6, n) if op == 3 else rng.uniform(0, 2.5, n))
  factors[0, op] = 0.0 if op < 3 else 0.5  # black / mean / grey / the opposite hue
  orders = np.stack([rng.permutation(4) for _ in range(n)]).astype(np.int32)
  out = np.asarray(_adjust(images, factors, orders))
  assert out.dtype == np.float32 and out.shape == images.shape
  for i in range(n):
    expected = _np_adjust(images[i], factors[i], [op])
    np.testing.assert_allclose(out[i], expected, atol=COLOUR_TOL, rtol=0,
                               err_msg=f"op {op}, factor {factors[i, op]}")


def test_adjust_colour_random_order(rng):
  """Random factors in the default jitter ranges, in random orders (every order's
  result differs: the ops do not commute)."""
  n = 8
  images = np.stack([_colour_image(rng) for _ in range(n)])
  factors = np.stack([rng.uniform(0.6, 1.4, n), rng.uniform(0.6, 1.4, n),
                      rng.uniform(0.6, 1.4, n), rng.uniform(-0.1, 0.1, n)], 1)
  factors = factors.astype(np.float32)
  orders = np.stack([rng.permutation(4) for _ in range(n)]).astype(np.int32)
  out = np.asarray(_adjust(images, factors, orders))
  for i in range(n):
    np.testing.assert_allclose(out[i], _np_adjust(images[i], factors[i], orders[i]),
                               atol=COLOUR_TOL, rtol=0, err_msg=str(orders[i]))
  reversed_order = np.asarray(_adjust(images, factors, orders[:, ::-1].copy()))
  assert np.abs(reversed_order - out).max() > 100 * COLOUR_TOL


@pytest.mark.parametrize("strength", [(0.4, 0.4, 0.4, 0.1), (1.5, 0.0, 0.25, 0.5)])
def test_jitter_draws_distribution(rng, strength):
  """20000 draws: factors ~ U[max(0, 1 - v), 1 + v] (hue U[-v, v]): inside the range,
  reaching both ends, means and variances within 5 standard errors; orders are
  permutations, each op first a quarter of the time (within 5 standard errors)."""
  n = 20000
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), n)
  factors, orders = jax.jit(jax.vmap(lambda k: dv.jitter_draws(k, strength)))(keys)
  factors, orders = np.asarray(factors, np.float64), np.asarray(orders)
  assert factors.shape == (n, 4) and orders.shape == (n, 4)
  bounds = [(max(0.0, 1 - v), 1 + v) for v in strength[:3]] + [
      (-strength[3], strength[3])]
  for i, (low, high) in enumerate(bounds):
    f = factors[:, i]
    assert f.min() >= low - 1e-6 and f.max() <= high + 1e-6, (i, f.min(), f.max())
    width = high - low
    if width == 0:
      np.testing.assert_allclose(f, low, atol=1e-6)
      continue
    assert f.min() < low + 0.01 * width and f.max() > high - 0.01 * width
    se_mean = width / math.sqrt(12 * n)
    assert abs(f.mean() - (low + high) / 2) <= SIGMAS * se_mean, (i, f.mean())
    # U's variance is width^2 / 12; its sample's standard error: sqrt(4/5 / n) of it.
    var = width**2 / 12
    assert abs(f.var() - var) <= SIGMAS * var * math.sqrt(0.8 / n), (i, f.var(), var)
  np.testing.assert_array_equal(np.sort(orders, 1), np.broadcast_to(np.arange(4),
                                                                     orders.shape))
  first = np.bincount(orders[:, 0], minlength=4) / n
  assert np.all(np.abs(first - 0.25) <= SIGMAS * math.sqrt(0.25 * 0.75 / n)), first
  assert len({tuple(o) for o in orders}) == 24


def test_color_jitter_is_adjust_colour_of_its_draws(rng):
  image = _colour_image(rng)
  key = jax.random.key(int(rng.integers(2**31)))
  factors, order = dv.jitter_draws(key, (0.4, 0.3, 0.2, 0.1))
  out = dv.color_jitter(image, key, strength=(0.4, 0.3, 0.2, 0.1))
  np.testing.assert_allclose(np.asarray(out), _np_adjust(image, factors, order),
                             atol=COLOUR_TOL, rtol=0)


# ------------------------------------------------------------------------ blur


def _np_blur(x, sigma, kernel_size, mode="mirror"):
  """float64 separable Gaussian blur through SciPy; "mirror" is d c b | a b c d."""
  taps = np.arange(kernel_size) - kernel_size // 2
  kernel = np.exp(-0.5 * (taps / sigma) ** 2)
  kernel /= kernel.sum()
  out = ndimage.convolve1d(np.asarray(x, np.float64), kernel, axis=0, mode=mode)
  return ndimage.convolve1d(out, kernel, axis=1, mode=mode)


@pytest.mark.parametrize("shape,kernel_size", [
    ((224, 224, 3), 23), ((32, 32, 3), 3), ((9, 14, 3), 23), ((1, 5, 2), 7)])
def test_gaussian_blur_matches_scipy_mirror(rng, shape, kernel_size):
  """Random sigma in [0.1, 2] (and a wide one, 6): == SciPy's "mirror" borders (the
  edge pixel not repeated), also for images smaller than the kernel (reflected again
  and again); SciPy's "reflect" (the edge repeated) is measurably different."""
  image = rng.uniform(0, 1, shape).astype(np.float32)
  blur = jax.jit(dv.gaussian_blur, static_argnames="kernel_size")
  for sigma in (*rng.uniform(0.1, 2.0, 2), 6.0):
    out = blur(image, np.float32(sigma), kernel_size=kernel_size)
    assert out.shape == shape and out.dtype == jnp.float32
    expected = _np_blur(image, np.float32(sigma), kernel_size)
    np.testing.assert_allclose(np.asarray(out), expected, atol=BLUR_TOL, rtol=0,
                               err_msg=f"sigma {sigma}")
    if sigma > 1 and min(shape[:2]) > 1:
      repeated = _np_blur(image, np.float32(sigma), kernel_size, mode="reflect")
      assert np.abs(repeated - expected).max() > 1e-3


def test_blur_kernel_size_is_a_tenth_odd_at_least_three():
  for size, taps in [(224, 23), (32, 3), (20, 3), (64, 7), (96, 9), (160, 17),
                     (384, 39)]:
    assert dv.blur_kernel_size(size) == taps, size


# ------------------------------------------------------------------------ MoCo


def _np_map_box(box, hw, side):
  """An original-image box onto the `side x side` cache: both ends times side / height
  (rows) or side / width (columns), rounded half to even; start <= side - 1, end in
  [start + 1, side]."""
  out = []
  for axis in range(2):
    start = min(round(box[axis] * side / hw[axis]), side - 1)
    end = round((box[axis] + box[axis + 2]) * side / hw[axis])
    end = min(max(end, start + 1), side)
    out.append((start, end - start))
  return out[0][0], out[1][0], out[0][1], out[1][1]


@functools.partial(jax.jit, static_argnames=("side", "scale"))
def _moco_boxes(keys, hw, *, side, scale=(0.2, 1.0)):
  return jax.vmap(lambda k: dv.moco_box(k, hw, side, scale=scale))(keys)


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
  _check_bounds(original, *hw)
  _check_bounds(cache, side, side)
  top, left, h, w = original.T.astype(np.float64)
  area = hw[0] * hw[1]
  assert ((h + 0.5) * (w + 0.5) >= 0.2 * area).all(), (h * w / area).min()
  assert ((h - 0.5) * (w - 0.5) <= area).all()
  assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all()
  assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
  ref = np.array([_ref_box(rng, *hw, scale=(0.2, 1.0))[:4] for _ in range(n)])
  for i, name in enumerate(["top", "left", "h", "w"]):
    _assert_means_close(original[:, i], ref[:, i], name)
  for b in range(0, n, 7):
    assert tuple(cache[b]) == _np_map_box(original[b], hw, side), (original[b], hw)


SIZE_M = 32  # MoCo view side in the tests (3 blur taps; 64 below: 7)


@functools.partial(jax.jit, static_argnames=(
    "size", "scale", "jitter", "jitter_p", "grayscale_p", "blur_p", "blur_sigma"))
def _moco(image, hw, keys, **options):
  """`moco_view` of one image with each of `keys` `[n]`: `[n, size, size, 3]`."""
  return jax.vmap(lambda key: dv.moco_view(image, hw, key, **options))(keys)


def _unnormalise(x):
  return np.asarray(x, np.float64) * STD + MEAN


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
  outs = _unnormalise(outs)
  crop_keys = jax.vmap(lambda k: jax.random.split(k, 7)[0])(keys)
  originals = _moco_boxes(crop_keys, jnp.asarray(hw, jnp.int32), side=side)[0]
  originals = np.asarray(originals)
  flips = []
  for b in range(n):
    top, left, h, w = _np_map_box(originals[b], hw, side)
    plain = _pil_float(image[top:top + h, left:left + w], SIZE_M)
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
  outs = _unnormalise(_moco(image, jnp.asarray([300, 400], jnp.int32), keys,
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
  outs = _unnormalise(_moco(image, jnp.asarray([300, 300], jnp.int32), keys, size=size,
                            scale=(1.5, 2.0), jitter_p=0.0, grayscale_p=0.0,
                            blur_sigma=(1.5, 1.5)))
  plain = _pil_float(image, size)
  blurred = _np_blur(plain, np.float32(1.5), max(3, int(0.1 * size) // 2 * 2 + 1))
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
    original = np.asarray(dv.moco_box(k[0], jnp.asarray(hw, jnp.int32), side)[0])
    top, left, h, w = _np_map_box(original, hw, side)
    x = _pil_float(image[top:top + h, left:left + w], size)
    if chance[0]:
      x = _np_adjust(x, *dv.jitter_draws(k[2], (0.4, 0.4, 0.4, 0.1)))
    if chance[1]:
      x = np.repeat(_np_gray(x), 3, -1)
    if chance[2]:
      x = _np_blur(x, float(jax.random.uniform(k[4], (), jnp.float32, 0.1, 2.0)), taps)
    if chance[3]:
      x = x[:, ::-1]
    np.testing.assert_allclose(outs[b], _normalise(x), atol=MOCO_TOL, rtol=0,
                               err_msg=f"view {b}: {chance}")


def test_batch_views_moco_same_pixels_on_one_and_eight_devices(rng):
  """kind="moco": sharded over 8 devices == one device == moco_view of each row with
  its view key (scale None: MoCo's (0.2, 1))."""
  batch = 16
  images = rng.integers(0, 256, (batch, SIDE, SIDE, 3), dtype=np.uint8)
  hw = rng.integers(20, 800, (batch, 2)).astype(np.int32)
  rows = rng.permutation(1000)[:batch].astype(np.int32)
  seed, step = int(rng.integers(2**31)), int(rng.integers(10**6))
  call = functools.partial(_batch_moco, seed=seed, step=step, view=0, size=SIZE,
                           kind="moco")
  device = jax.devices()[0]
  single = call(*(jax.device_put(a, device) for a in (images, hw, rows)))
  assert single.shape == (batch, SIZE, SIZE, 3) and single.dtype == jnp.float32
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  sharded = call(*(jax.device_put(a, sharding) for a in (images, hw, rows)))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=MOCO_TOL,
                             rtol=0)
  one = jax.jit(dv.moco_view, static_argnames="size")
  for b in range(batch):
    alone = one(images[b], hw[b], dv.view_key(seed, step, rows[b], 0), size=SIZE)
    np.testing.assert_allclose(np.asarray(alone), np.asarray(single[b]),
                               atol=MOCO_TOL, rtol=0, err_msg=f"row {rows[b]}")


def _batch_moco_fn(images, hw, rows, **kwargs):
  return dv.batch_views(images, hw=hw, rows=rows, **kwargs)


_batch_moco = jax.jit(_batch_moco_fn, static_argnames=("view", "size", "kind"))


def test_batch_views_rejects_unknown_kind_and_moco_without_hw():
  images = np.zeros((2, SIDE, SIDE, 3), np.uint8)
  rows = np.arange(2, dtype=np.int32)
  with pytest.raises(ValueError, match="kind"):
    dv.batch_views(images, seed=0, step=0, rows=rows, view=0, size=SIZE, kind="simclr")
  with pytest.raises(ValueError, match="hw"):
    dv.batch_views(images, seed=0, step=0, rows=rows, view=0, size=SIZE, kind="moco")


# ----------------------------------------------- reference views: flip, jitter


def test_reference_view_without_flip_never_flips(rng):
  """The whole image as the box (nothing fits the area range): with flip=False all 400
  views are the resized image itself, none its mirror."""
  n = 400
  image = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), n)
  outs = jax.jit(jax.vmap(lambda k: dv.reference_train_view(
      image, k, size=SIZE, scale=(1.5, 2.0), flip=False)))(keys)
  plain = _normalise(_pil_float(image, SIZE))
  assert np.abs(np.asarray(outs, np.float64) - plain).max() <= RESIZE_TOL / STD.min()


def test_reference_view_jitter_is_jitter_of_the_plain_view(rng):
  """jitter=(b, c, s, h): the same crop and flip as without jitter, then
  `adjust_colour` (float64 reference) of the draws of `jax.random.fold_in(key, 2)`."""
  strength = (0.4, 0.3, 0.2, 0.1)
  image = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
  view = jax.jit(dv.reference_train_view, static_argnames=("size", "jitter"))
  for seed in rng.integers(2**31, size=6):
    key = jax.random.key(int(seed))
    plain = _unnormalise(view(image, key, size=SIZE))
    jittered = np.asarray(view(image, key, size=SIZE, jitter=strength), np.float64)
    factors, order = dv.jitter_draws(jax.random.fold_in(key, 2), strength)
    expected = _normalise(_np_adjust(plain, factors, order))
    np.testing.assert_allclose(jittered, expected, atol=MOCO_TOL, rtol=0)
