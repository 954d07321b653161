"""Image views (bitune_jax.data.views) against independent NumPy / PIL / scipy references
of the documented semantics (torchvision's RandomResizedCrop, ColorJitter, Grayscale,
GaussianBlur; PIL's bilinear resize), on fresh random inputs.

Tolerances (all absolute):
* Resizing: TF's antialiased bilinear and PIL's bilinear (mode "F", float32 per channel)
  are the same triangle filter (support scaled by the shrink factor, weights renormalised
  at the borders); they agree to float32 rounding, ~1e-5 after the /std (x4.4) of the
  normalisation, so RESIZE_TOL = 1e-4. PIL's uint8 "RGB" path rounds its output and
  uses fixed-point weights, up to ~2/255 apart: 3/255/min(std) there.
* Colour ops: float32 vs float64 on values in [0, 1]: 1e-5 (hue through HSV: 1e-4).
* Blur: float32 separable convolution vs float64 scipy: 1e-5.
* Crop-box statistics over 2000 draws vs a 200k-draw NumPy Monte Carlo: the standard
  error of a mean or a quantile of the area fraction / log-aspect is <= ~0.01, so 0.03
  on means and 0.04 on quantiles (4+ sigma; the seeds are fixed, so no flakiness).
"""

import colorsys
import io
import itertools
import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import tensorflow as tf
from PIL import Image

from bitune_jax.data import views

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
LUMA = np.array([0.299, 0.587, 0.114])
RESIZE_TOL = 1e-4
COLOUR_TOL = 1e-5
HUE_TOL = 1e-4
BLUR_TOL = 1e-5


def _normalise(x):
  return (np.asarray(x, np.float64) - MEAN) / STD


def _unnormalise(x):
  return np.asarray(x, np.float64) * STD + MEAN


def _pil_resize(image, height, width):
  """uint8 `[H, W, 3]` -> float64 in [0, 1], PIL bilinear per channel in float mode."""
  channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F")
                         .resize((width, height), Image.BILINEAR)) for c in range(3)]
  return np.clip(np.stack(channels, -1).astype(np.float64) / 255.0, 0.0, 1.0)


def _ref_eval(image, size):
  resize = views.eval_resize(size)
  offset = (resize - size) // 2
  x = _pil_resize(image, resize, resize)[offset:offset + size, offset:offset + size]
  return _normalise(x)


def _encode(image, fmt, **kwargs):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _seed(*parts):
  return views.example_seed(1234, *parts)


# ---------------------------------------------------------------------------- eval


def test_eval_resize_side():
  """256 for 224 (the papers' ratio), 37 for 32."""
  assert views.eval_resize(224) == 256
  assert views.eval_resize(32) == 37
  assert views.eval_resize(112) == 128


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (20, 28), (28, 20)])
def test_eval_view_matches_pil(shape):
  """eval_view == PIL bilinear to eval_resize(32)=37, centre crop 32, ImageNet norm
  (downscale: antialiased; upscale: plain bilinear), on a random image."""
  rng = np.random.default_rng(sum(shape))
  image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
  out = views.eval_view(tf.constant(image), size=32, resize=views.eval_resize(32))
  assert out.shape == (32, 32, 3) and out.dtype == tf.float32
  np.testing.assert_allclose(out.numpy(), _ref_eval(image, 32), atol=RESIZE_TOL, rtol=0)
  # PIL's usual uint8 RGB resize, up to its output rounding and fixed-point weights.
  resize = views.eval_resize(32)
  rgb = np.asarray(Image.fromarray(image).resize((resize, resize), Image.BILINEAR)) / 255.
  np.testing.assert_allclose(out.numpy(), _normalise(rgb[2:34, 2:34]),
                             atol=3 / 255 / STD.min(), rtol=0)


def test_eval_view_default_shape_and_encoded_inputs():
  """Default 224 (from 256) shape and dtype; PNG bytes == the raw pixels; JPEG bytes ==
  its TF-decoded pixels and close to the PIL-decoded reference."""
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
  out = views.eval_view(tf.constant(image))
  assert out.shape == (224, 224, 3) and out.dtype == tf.float32
  np.testing.assert_allclose(out.numpy(), _ref_eval(image, 224), atol=RESIZE_TOL, rtol=0)

  small = rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)
  png = views.eval_view(tf.constant(_encode(small, "PNG")), size=32, resize=37)
  raw = views.eval_view(tf.constant(small), size=32, resize=37)
  assert png.shape == (32, 32, 3) and png.dtype == tf.float32
  np.testing.assert_array_equal(png.numpy(), raw.numpy())
  np.testing.assert_allclose(png.numpy(), _ref_eval(small, 32), atol=RESIZE_TOL, rtol=0)

  # A smooth image, so that JPEG is nearly lossless and decoders barely differ.
  yy, xx = np.mgrid[0:50, 0:40]
  smooth = np.stack([128 + 100 * np.sin(xx / 9 + c) * np.cos(yy / 7) for c in range(3)],
                    -1).round().astype(np.uint8)
  jpeg = _encode(smooth, "JPEG", quality=95)
  out = views.eval_view(tf.constant(jpeg), size=32, resize=37)
  assert out.shape == (32, 32, 3) and out.dtype == tf.float32
  decoded = tf.io.decode_jpeg(jpeg, channels=3).numpy()
  np.testing.assert_allclose(out.numpy(), _ref_eval(decoded, 32), atol=RESIZE_TOL, rtol=0)
  pil_decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
  # Decoders (IDCT / chroma upsampling) may differ by a few levels per pixel.
  np.testing.assert_allclose(out.numpy(), _ref_eval(pil_decoded, 32),
                             atol=6 / 255 / STD.min(), rtol=0)


# ------------------------------------------------------------------ crop boxes


def _ref_fallback(height, width, ratio=(3 / 4, 4 / 3)):
  """torchvision's fallback: the whole image, aspect clamped to `ratio`, centred."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def _ref_boxes(rng, n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
               attempts=10):
  """NumPy Monte Carlo of torchvision's RandomResizedCrop.get_params: `[n, 4]` (y, x, h, w)."""
  area = height * width * rng.uniform(scale[0], scale[1], (n, attempts))
  aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, attempts)))
  w = np.round(np.sqrt(area * aspect)).astype(int)
  h = np.round(np.sqrt(area / aspect)).astype(int)
  fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
  out = np.empty((n, 4), int)
  for i in range(n):
    hit = np.flatnonzero(fits[i])
    if hit.size:
      k = hit[0]
      bh, bw = h[i, k], w[i, k]
      out[i] = (rng.integers(0, height - bh + 1), rng.integers(0, width - bw + 1), bh, bw)
    else:
      out[i] = _ref_fallback(height, width, ratio)
  return out


@tf.function
def _boxes(seeds, height, width, scale):
  return tf.map_fn(
      lambda s: tf.stack(views.random_resized_crop_box(s, height, width, scale=scale)),
      seeds, fn_output_signature=tf.int32)


def _many_boxes(n, height, width, scale=(0.08, 1.0)):
  seeds = tf.stack([tf.fill([n], tf.constant(77, tf.int64)), tf.range(n, dtype=tf.int64)],
                   axis=1)
  return _boxes(seeds, height, width, scale).numpy()


def _check_box_bounds(boxes, height, width, scale, ratio=(3 / 4, 4 / 3)):
  y, x, h, w = boxes.T.astype(np.float64)
  assert (h >= 1).all() and (w >= 1).all()
  assert (y >= 0).all() and (x >= 0).all()
  assert (y + h <= height).all() and (x + w <= width).all()
  # w, h are round(sqrt(area * r)), round(sqrt(area / r)): each within 0.5 of the exact.
  assert ((w + 0.5) / np.maximum(h - 0.5, 1e-9) >= ratio[0]).all()
  assert ((w - 0.5) / (h + 0.5) <= ratio[1]).all()
  assert ((w + 0.5) * (h + 0.5) >= scale[0] * height * width).all()
  assert ((w - 0.5) * (h - 0.5) <= scale[1] * height * width).all()


def _compare_distributions(ours, ref, mean_tol, quantile_tol):
  qs = [0.1, 0.25, 0.5, 0.75, 0.9]
  assert abs(ours.mean() - ref.mean()) < mean_tol, (ours.mean(), ref.mean())
  np.testing.assert_allclose(np.quantile(ours, qs), np.quantile(ref, qs), atol=quantile_tol)
  assert scipy.stats.ks_2samp(ours, ref).pvalue > 1e-4


@pytest.mark.parametrize("height,width,scale", [
    (200, 300, (0.08, 1.0)), (256, 256, (0.08, 1.0)), (240, 180, (0.2, 1.0))])
def test_crop_box_bounds_and_distribution(height, width, scale):
  """2000 boxes: inside the image, aspect and area within range up to rounding; area
  fraction, log-aspect and placement distributed as a Monte Carlo of torchvision's rule."""
  boxes = _many_boxes(2000, height, width, scale)
  _check_box_bounds(boxes, height, width, scale)
  ref = _ref_boxes(np.random.default_rng(height + width), 200_000, height, width, scale)
  for b in (boxes, ref):
    assert b.shape[1] == 4
  frac = lambda b: b[:, 2] * b[:, 3] / (height * width)
  log_aspect = lambda b: np.log(b[:, 3] / b[:, 2])
  _compare_distributions(frac(boxes), frac(ref), 0.03, 0.04)
  _compare_distributions(log_aspect(boxes), log_aspect(ref), 0.03, 0.04)
  # Placement uniform over the slack: (y + 1/2) / (H - h + 1) ~ U(0, 1) for either axis.
  for pos, side, extent in ((0, height, 2), (1, width, 3)):
    u = (boxes[:, pos] + 0.5) / (side - boxes[:, extent] + 1)
    ref_u = (ref[:, pos] + 0.5) / (side - ref[:, extent] + 1)
    _compare_distributions(u, ref_u, 0.03, 0.05)
  # Not degenerate: the draws vary.
  assert len(np.unique(boxes, axis=0)) > 1900


def test_crop_box_scale_is_honoured():
  """scale=(0.2, 1): no area fraction below 0.2 (up to rounding), and many near it."""
  boxes = _many_boxes(2000, 256, 256, (0.2, 1.0))
  frac = boxes[:, 2] * boxes[:, 3] / 256**2
  assert frac.min() >= 0.19 and frac.min() < 0.21
  default = _many_boxes(2000, 256, 256)
  frac_default = default[:, 2] * default[:, 3] / 256**2
  assert frac_default.min() < 0.1 and (frac_default < 0.19).mean() > 0.05


@pytest.mark.parametrize("height,width", [(10, 400), (400, 10), (3, 100)])
def test_crop_box_fallback(height, width):
  """An extreme aspect ratio fits no attempt: every seed gives torchvision's centre crop
  with the aspect clamped (e.g. 10x400 -> h 10, w round(40/3)=13 at x 193)."""
  boxes = _many_boxes(200, height, width)
  expected = _ref_fallback(height, width)
  np.testing.assert_array_equal(boxes, np.tile(expected, (200, 1)))
  if (height, width) == (10, 400):
    assert expected == (0, 193, 10, 13)


def test_crop_box_near_full_scale():
  """scale ~1 on a square image: the whole image, or one pixel less on a side from the
  rounding of w and h (as torchvision's), rarely."""
  boxes = _many_boxes(300, 64, 64, (0.999, 1.0))
  _check_box_bounds(boxes, 64, 64, (0.999, 1.0))
  assert (boxes[:, 2:] >= 63).all()
  assert (boxes[:, 2:] == 64).all(1).mean() > 0.9


# ---------------------------------------------------------------------- colour


def _hue_shift(x, delta):
  """Hue rotation by `delta` of the colour circle, through colorsys (float64)."""
  flat = x.reshape(-1, 3)
  out = np.empty_like(flat)
  for i, (r, g, b) in enumerate(flat):
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    out[i] = colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
  return out.reshape(x.shape)


def _ref_adjust(x, factors, order):
  """torchvision's ColorJitter given its draws, in float64."""
  x = np.asarray(x, np.float64)
  b, c, s, h = [float(f) for f in factors]
  for op in order:
    if op == 0:
      x = x * b
    elif op == 1:
      x = c * x + (1 - c) * (x @ LUMA).mean()
    elif op == 2:
      x = s * x + (1 - s) * (x @ LUMA)[..., None]
    else:
      x = _hue_shift(x, h)
    x = np.clip(x, 0.0, 1.0)
  return x


def test_grayscale_luma():
  """ITU-R 601-2 luma, `[H, W, 1]`."""
  x = np.random.default_rng(2).uniform(size=(5, 7, 3)).astype(np.float32)
  out = views._grayscale(tf.constant(x)).numpy()
  assert out.shape == (5, 7, 1)
  np.testing.assert_allclose(out[..., 0], x @ LUMA, atol=COLOUR_TOL, rtol=0)


@pytest.mark.parametrize("op", range(4))
def test_adjust_colour_single_ops(op):
  """Each op alone (the others at identity) equals its reference, incl. clipping."""
  rng = np.random.default_rng(10 + op)
  x = rng.uniform(size=(9, 11, 3)).astype(np.float32)
  for value in ((0.3, 1.7), (0.2, 1.6), (0.0, 1.8), (-0.45, 0.3))[op]:
    factors = np.array([1.0, 1.0, 1.0, 0.0], np.float32)
    factors[op] = value
    order = np.array([op] + [i for i in range(4) if i != op], np.int32)
    out = views.adjust_colour(tf.constant(x), tf.constant(factors), tf.constant(order))
    tol = HUE_TOL if op == 3 else COLOUR_TOL
    np.testing.assert_allclose(out.numpy(), _ref_adjust(x, factors, order), atol=tol, rtol=0)


def test_adjust_colour_all_orders():
  """All 24 orders, random factors (ranges wide enough to clip): the order matters and
  is honoured."""
  rng = np.random.default_rng(3)
  x = rng.uniform(size=(8, 10, 3)).astype(np.float32)
  fn = tf.function(views.adjust_colour)
  outputs = []
  for order in itertools.permutations(range(4)):
    factors = np.array([rng.uniform(0.5, 1.6), rng.uniform(0.5, 1.6), rng.uniform(0.3, 1.7),
                        rng.uniform(-0.2, 0.2)], np.float32)
    out = fn(tf.constant(x), tf.constant(factors), tf.constant(order, tf.int32)).numpy()
    np.testing.assert_allclose(out, _ref_adjust(x, factors, order), atol=HUE_TOL, rtol=0)
    outputs.append(out)
  # Same factors in two orders differ (clipping and blends do not commute).
  factors = tf.constant([1.5, 0.6, 1.6, 0.15])
  a = views.adjust_colour(tf.constant(x), factors, tf.constant([0, 1, 2, 3]))
  b = views.adjust_colour(tf.constant(x), factors, tf.constant([3, 2, 1, 0]))
  assert np.abs(a.numpy() - b.numpy()).max() > 1e-2


def test_jitter_draws_ranges_and_order():
  """Factors in U[max(0, 1 - v), 1 + v] (hue U[-v, v]), the order a permutation; every
  permutation shows up over 600 seeds; color_jitter == adjust_colour of the draws."""
  strength = (1.5, 0.4, 0.2, 0.1)
  draws = tf.function(lambda s: views.jitter_draws(s, strength))
  factors, orders = zip(*[(f.numpy(), o.numpy())
                          for f, o in (draws(_seed(7, i)) for i in range(600))])
  factors, orders = np.array(factors), np.array(orders)
  lows, highs = (0.0, 0.6, 0.8, -0.1), (2.5, 1.4, 1.2, 0.1)
  for j in range(4):
    assert (factors[:, j] >= lows[j]).all() and (factors[:, j] <= highs[j]).all()
    span = highs[j] - lows[j]
    assert factors[:, j].min() < lows[j] + 0.02 * span
    assert factors[:, j].max() > highs[j] - 0.02 * span
    assert abs(factors[:, j].mean() - (lows[j] + highs[j]) / 2) < 0.05 * span
  assert orders.dtype == np.int32
  np.testing.assert_array_equal(np.sort(orders, 1), np.tile(np.arange(4), (600, 1)))
  assert len({tuple(o) for o in orders}) == 24
  # The four draws are independent of each other (no shared stream).
  assert abs(np.corrcoef(factors.T)[np.triu_indices(4, 1)]).max() < 0.15
  x = np.random.default_rng(4).uniform(size=(6, 6, 3)).astype(np.float32)
  seed = _seed(7, 5)
  f, o = views.jitter_draws(seed)
  out = views.color_jitter(tf.constant(x), seed).numpy()
  np.testing.assert_allclose(out, _ref_adjust(x, f.numpy(), o.numpy()), atol=HUE_TOL, rtol=0)


# ------------------------------------------------------------------------ blur


def _ref_blur(x, sigma, kernel_size):
  """Truncated normalised Gaussian along both axes, scipy 'mirror' (== tf REFLECT:
  the edge pixel is not repeated), float64."""
  radius = kernel_size // 2
  taps = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * (taps / sigma) ** 2)
  kernel /= kernel.sum()
  out = scipy.ndimage.correlate1d(np.asarray(x, np.float64), kernel, axis=0, mode="mirror")
  return scipy.ndimage.correlate1d(out, kernel, axis=1, mode="mirror")


@pytest.mark.parametrize("sigma,kernel_size,shape", [
    (0.1, 3, (30, 25)), (0.8, 7, (30, 25)), (2.0, 23, (30, 25)), (1.3, 11, (30, 25)),
    (1.7, 23, (12, 9)), (0.5, 3, (2, 7))])
def test_gaussian_blur_matches_scipy(sigma, kernel_size, shape):
  """Separable truncated normalised Gaussian, reflected borders == scipy 'mirror'
  (incl. a kernel wider than the image, radius <= 2 (side - 1))."""
  rng = np.random.default_rng(kernel_size)
  x = rng.uniform(size=shape + (3,)).astype(np.float32)
  out = views.gaussian_blur(tf.constant(x), tf.constant(sigma, tf.float32),
                            kernel_size=kernel_size).numpy()
  radius = kernel_size // 2
  ref = _ref_blur(x, sigma, kernel_size)
  assert out.shape == x.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, ref, atol=BLUR_TOL, rtol=0)
  # The same kernel as scipy's own truncated Gaussian filter.
  ref2 = scipy.ndimage.gaussian_filter(x.astype(np.float64), sigma=(sigma, sigma, 0),
                                       radius=(radius, radius, 0), mode="mirror")
  np.testing.assert_allclose(out, ref2, atol=BLUR_TOL, rtol=0)


@pytest.mark.parametrize("shape,kernel_size", [((1, 1), 3), ((1, 6), 3), ((5, 4), 23)])
def test_gaussian_blur_tiny_images(shape, kernel_size):
  """Images narrower than the kernel's reach: a constant stays constant, and the
  result is scipy's 'mirror' (reflected as often as needed)."""
  x = np.full(shape + (3,), 0.6, np.float32)
  out = views.gaussian_blur(tf.constant(x), tf.constant(1.5), kernel_size=kernel_size)
  np.testing.assert_allclose(out.numpy(), x, atol=BLUR_TOL, rtol=0)
  x = np.random.default_rng(0).uniform(size=shape + (3,)).astype(np.float32)
  out = views.gaussian_blur(tf.constant(x), tf.constant(1.5), kernel_size=kernel_size)
  np.testing.assert_allclose(out.numpy(), _ref_blur(x, 1.5, kernel_size), atol=BLUR_TOL,
                             rtol=0)


# ---------------------------------------------------------- train and MoCo views


def _two_halves(height=40, width=50):
  """Left half colour A, right half colour B (uint8); returns the image, A and B."""
  a, b = np.array([200, 30, 60], np.uint8), np.array([20, 180, 240], np.uint8)
  image = np.empty((height, width, 3), np.uint8)
  image[:, :width // 2], image[:, width // 2:] = a, b
  return image, a / 255.0, b / 255.0


def _on_segment(view, a, b, tol=1e-5):
  """Every un-normalised pixel is a convex combination of colours a and b."""
  x = _unnormalise(view).reshape(-1, 3)
  d = b - a
  t = (x - a) @ d / (d @ d)
  residual = x - (a + t[:, None] * d)
  assert np.abs(residual).max() < tol
  assert t.min() > -tol and t.max() < 1 + tol
  return t


def test_example_seed():
  """Deterministic `[2]` int64; each part changes it; an int and its `[s, 0]` agree."""
  s = views.example_seed(5, 0, 3, 7, 0)
  assert s.shape == (2,) and s.dtype == tf.int64
  np.testing.assert_array_equal(s, views.example_seed(5, 0, 3, 7, 0))
  np.testing.assert_array_equal(s, views.example_seed(tf.constant([5, 0]), 0, 3, 7, 0))
  seeds = {tuple(views.example_seed(*p).numpy()) for p in
           [(5, 0, 3, 7, 0), (5, 0, 3, 7, 1), (5, 1, 3, 7, 0), (5, 0, 4, 7, 0),
            (5, 0, 3, 8, 0), (6, 0, 3, 7, 0)]}
  assert len(seeds) == 6


@pytest.mark.parametrize("kind", ["train", "moco"])
def test_views_deterministic_and_distinct(kind):
  """Same seed -> identical view; the two view numbers -> different views; encoded PNG
  bytes and the raw pixels give the same view."""
  image = np.random.default_rng(5).integers(0, 256, (40, 52, 3), dtype=np.uint8)
  if kind == "train":
    fn = lambda img, s: views.train_view(img, s, size=24, resize=28,
                                         jitter=views.DEFAULT_JITTER)
  else:
    fn = lambda img, s: views.moco_view(img, s, size=24)
  q = fn(tf.constant(image), _seed(0, 9, 3, 0)).numpy()
  again = fn(tf.constant(image), _seed(0, 9, 3, 0)).numpy()
  k = fn(tf.constant(image), _seed(0, 9, 3, 1)).numpy()
  png = fn(tf.constant(_encode(image, "PNG")), _seed(0, 9, 3, 0)).numpy()
  assert q.shape == (24, 24, 3) and q.dtype == np.float32 and np.isfinite(q).all()
  np.testing.assert_array_equal(q, again)
  np.testing.assert_array_equal(q, png)
  assert np.abs(q - k).max() > 1e-2


def test_train_view_solid_and_two_colour_images():
  """No jitter: a solid image gives its normalised colour everywhere; a two-colour
  image gives, in both views, only blends of its two colours."""
  colour = np.array([250, 10, 128], np.uint8)
  solid = np.tile(colour, (33, 47, 1))
  for view in range(4):
    for resize in (0, 36):
      out = views.train_view(tf.constant(solid), _seed(1, 2, 3, view), size=16,
                             resize=resize).numpy()
      np.testing.assert_allclose(out, np.broadcast_to(_normalise(colour / 255), out.shape),
                                 atol=1e-5, rtol=0)
  image, a, b = _two_halves()
  ts = []
  for view in range(2):
    out = views.train_view(tf.constant(image), _seed(1, 2, 4, view), size=16,
                           resize=56).numpy()
    ts.append(_on_segment(out, a, b))
  assert not np.allclose(ts[0], ts[1])


def test_moco_view_solid_and_two_colour_images():
  """A solid image stays uniform (jitter, grayscale and blur act on every pixel alike);
  with jitter and grayscale off, it keeps its colour and a two-colour image keeps only
  blends of its colours (blur and bilinear resampling are convex)."""
  colour = np.array([40, 200, 90], np.uint8)
  solid = tf.constant(np.tile(colour, (30, 40, 1)))
  fn = tf.function(lambda img, s: views.moco_view(img, s, size=16))
  for view in range(20):
    out = _unnormalise(fn(solid, _seed(2, view)).numpy())
    assert np.isfinite(out).all()
    assert np.abs(out - out[0, 0]).max() < 1e-5
  plain = tf.function(lambda img, s: views.moco_view(img, s, size=16, jitter_p=0.0,
                                                     grayscale_p=0.0, blur_p=1.0))
  out = plain(solid, _seed(2, 0)).numpy()
  np.testing.assert_allclose(out, np.broadcast_to(_normalise(colour / 255), out.shape),
                             atol=1e-5, rtol=0)
  image, a, b = _two_halves()
  ts = [_on_segment(plain(tf.constant(image), _seed(3, view)).numpy(), a, b)
        for view in range(2)]
  assert not np.allclose(ts[0], ts[1])


def _near_full_boxes(height, width, resize):
  """Every crop of the original a scale-~1 box can give: sides of `side - 1` or `side`
  at any offset, drawn on the `resize x resize` image and mapped back at the same
  relative box when `resize`."""
  grid_h, grid_w = (resize, resize) if resize else (height, width)
  out = set()
  for h in (grid_h - 1, grid_h):
    for w in (grid_w - 1, grid_w):
      for y in range(grid_h - h + 1):
        for x in range(grid_w - w + 1):
          if resize:
            y0, y1 = round(y * height / resize), round((y + h) * height / resize)
            x0, x1 = round(x * width / resize), round((x + w) * width / resize)
            out.add((y0, max(y1, y0 + 1), x0, max(x1, x0 + 1)))
          else:
            out.add((y, y + h, x, x + w))
  return sorted(out)


@pytest.mark.parametrize("height,width,resize", [(64, 64, 0), (48, 64, 40)])
def test_train_view_flip(height, width, resize):
  """Full crops (scale ~1) of a left-right gradient: each view is the PIL resize of the
  whole image (or of a crop one pixel short, from rounding), or its mirror; mirrored in
  35-65 of 100 seeds."""
  xx = np.linspace(0, 1, width)[None, :, None]
  yy = np.linspace(0, 1, height)[:, None, None]
  image = np.round(255 * np.concatenate([xx + 0 * yy, yy + 0 * xx, 0.5 + 0 * xx * yy], -1)
                   ).astype(np.uint8)
  fn = tf.function(lambda s: views.train_view(tf.constant(image), s, size=32,
                                              resize=resize, scale=(0.999, 1.0)))
  boxes = _near_full_boxes(height, width, resize)
  refs = [_normalise(_pil_resize(image[y0:y1, x0:x1], 32, 32)) for y0, y1, x0, x1 in boxes]
  whole = refs[boxes.index((0, height, 0, width))]
  flips = full = 0
  for i in range(100):
    out = fn(_seed(4, 0, i, 0)).numpy()
    errors = [np.abs(out - r).max() for r in refs]
    mirrored = [np.abs(out - r[:, ::-1]).max() for r in refs]
    flipped = min(mirrored) < min(errors)
    assert min(min(errors), min(mirrored)) < RESIZE_TOL
    flips += flipped
    full += np.abs(out - (whole[:, ::-1] if flipped else whole)).max() < RESIZE_TOL
  assert 35 <= flips <= 65, flips
  assert full >= 80, full


def _all_crop_views(image, size, resize):
  """Every box of the `resize x resize` grid (of the image itself if `resize` is 0),
  mapped back to the original at the same relative box, and the PIL resize of that crop
  of the original to `size`: `(grid boxes [N, 4] as (y, x, h, w), views [N, S, S, 3])`."""
  height, width = image.shape[:2]
  grid_h, grid_w = (resize, resize) if resize else (height, width)
  boxes, crops = [], []
  for h in range(1, grid_h + 1):
    for w in range(1, grid_w + 1):
      for y in range(grid_h - h + 1):
        for x in range(grid_w - w + 1):
          if resize:
            y0, y1 = round(y * height / resize), round((y + h) * height / resize)
            x0, x1 = round(x * width / resize), round((x + w) * width / resize)
            y1, x1 = max(y1, y0 + 1), max(x1, x0 + 1)
          else:
            y0, y1, x0, x1 = y, y + h, x, x + w
          boxes.append((y, x, h, w))
          crops.append(_pil_resize(image[y0:y1, x0:x1], size, size))
  return np.array(boxes), _normalise(np.stack(crops))


@pytest.mark.parametrize("kind,height,width,resize", [
    ("train", 12, 10, 0), ("train", 20, 30, 7), ("moco", 10, 13, 0)])
def test_view_is_a_resized_crop(kind, height, width, resize):
  """Each view of a random image (MoCo: colour ops and blur off) is the PIL resize of one
  crop of the original (the box drawn on the `resize` grid and mapped back at the same
  relative box), possibly mirrored; the boxes respect the scale (train 0.08-1, MoCo
  0.2-1) and aspect ranges; the two views of a row differ."""
  rng = np.random.default_rng(height * width)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  boxes, refs = _all_crop_views(image, 8, resize)
  grid_h, grid_w = (resize, resize) if resize else (height, width)
  if kind == "train":
    scale = (0.08, 1.0)
    fn = tf.function(lambda s: views.train_view(tf.constant(image), s, size=8,
                                                resize=resize))
  else:
    scale = (0.2, 1.0)
    fn = tf.function(lambda s: views.moco_view(tf.constant(image), s, size=8, jitter_p=0.0,
                                               grayscale_p=0.0, blur_p=0.0))
  found, flips = [], 0
  for i in range(60):
    out = fn(_seed(8, 0, i // 2, i % 2)).numpy()
    errors = np.abs(refs - out).max((1, 2, 3))
    mirrored = np.abs(refs[:, :, ::-1] - out).max((1, 2, 3))
    flipped = mirrored.min() < errors.min()
    k = np.argmin(mirrored if flipped else errors)
    assert min(errors.min(), mirrored.min()) < RESIZE_TOL, (i, errors.min(), mirrored.min())
    flips += flipped
    found.append(boxes[k])
  found = np.array(found)
  _check_box_bounds(found, grid_h, grid_w, scale)
  assert 15 <= flips <= 45, flips
  assert len(np.unique(found, axis=0)) > 40
  assert (found[0::2] != found[1::2]).any(1).mean() > 0.8  # the two views of a row differ


def test_moco_view_grayscale_fraction():
  """~20% of 200 MoCo views of a colourful image are grayscale (channels equal after
  un-normalising; saturation jitter >= 0.6 never greys it); all finite, right shape."""
  rng = np.random.default_rng(6)
  blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  blocks[..., 0] = np.maximum(blocks[..., 0], 200)  # far from grey everywhere
  blocks[..., 2] = np.minimum(blocks[..., 2], 40)
  image = tf.constant(np.kron(blocks, np.ones((10, 12, 1), np.uint8)))
  fn = tf.function(lambda s: views.moco_view(image, s, size=16))
  grey = 0
  for i in range(200):
    out = fn(_seed(5, 0, i, i % 2)).numpy()
    assert out.shape == (16, 16, 3) and out.dtype == np.float32 and np.isfinite(out).all()
    x = _unnormalise(out)
    spread = np.abs(x - x.mean(-1, keepdims=True)).max()
    is_grey = spread < 1e-4
    assert is_grey or spread > 1e-2  # nothing in between
    grey += is_grey
  assert 0.1 <= grey / 200 <= 0.3, grey


def test_moco_view_default_size():
  """The default 224 view (23-tap blur) has the right shape and is finite."""
  image = np.random.default_rng(7).integers(0, 256, (180, 240, 3), dtype=np.uint8)
  for view in range(3):
    out = views.moco_view(tf.constant(image), _seed(6, view)).numpy()
    assert out.shape == (224, 224, 3) and out.dtype == np.float32 and np.isfinite(out).all()
