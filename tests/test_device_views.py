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
"""

import ast
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

from bitune_jax.data import device_views as dv

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
RESIZE_TOL = 1e-4
RGB_MAX_TOL = 1.5 / 255
RGB_MEAN_TOL = 0.5 / 255
NORM_TOL = 2e-6
CROSS_TOL = 1e-5
SIGMAS = 5.0
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
  """Same MEAN_RGB / STD_RGB as views.py (read from its source: no TensorFlow)."""
  path = os.path.join(os.path.dirname(dv.__file__), "views.py")
  with open(path) as f:
    tree = ast.parse(f.read())
  constants = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
               if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
               and node.targets[0].id in ("MEAN_RGB", "STD_RGB")}
  assert constants == {"MEAN_RGB": dv.MEAN_RGB, "STD_RGB": dv.STD_RGB}
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
