"""Image views in JAX, made on the accelerator inside `jax.jit` from a uint8 cache.

The host-side TensorFlow views these replace (tf.data, formerly
`bitune_jax.data.views`) decoded and resized every image on every step. These
functions make the same reference views from a uint8 cache of
images already resized to `S x S` (`S = eval_resize(size)`, 256 for 224 crops: the
reference's `Resize((256, 256))` before `RandomResizedCrop(224)`), as pure, jittable
and vmappable JAX functions, so the cache can live on the devices and the views be
drawn inside the training step.

* `crop_box`: torchvision's RandomResizedCrop box, branch-free: `attempts` candidates
  (area fraction U(scale), log-uniform aspect w/h in `ratio`, `w = round(sqrt(area *
  aspect))`, `h = round(sqrt(area / aspect))`) are drawn at once and the first that
  fits is placed uniformly (integer top / left); if none fits, the centre crop of the
  whole image with its aspect ratio clamped to `ratio`.
* `crop_and_resize`: the box resampled to `size x size`, bilinear with antialiasing
  when shrinking (PIL's and torchvision's `antialias=True` triangle filter: support
  scaled by the shrink factor, sampled at pixel centres, weights renormalised, only
  pixels of the box taken, as torchvision crops before it resizes): the rows as
  weighted sums of the few cache rows under each output row's triangle, the columns
  as a product with a `[size, S]` weight matrix built for the (traced) box.
* `reference_train_view`: crop box, crop-and-resize, horizontal flip with p 0.5 (or
  none), optional colour jitter, ImageNet normalisation. `eval_view`: the centre
  `size x size` of the cache image.
* Colour and blur, torchvision's semantics in float32: `adjust_colour` / `jitter_draws`
  / `color_jitter` (ColorJitter: brightness, contrast, saturation, hue in a random
  order, each clipped to [0, 1]; the hue rotated through HSV), `grayscale` (ITU-R
  601-2 luma), `gaussian_blur` (separable, reflected borders, sums of shifted slices).
* `moco_view` (MoCo v2): random resized crop of area 0.2-1 drawn in the ORIGINAL
  image's pixels (`moco_box`: `crop_box` on its `hw`, then mapped onto the `S x S`
  cache), resampled to `size`, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale
  p 0.2, Gaussian blur (sigma 0.1-2, `blur_kernel_size(size)` taps: 23 at 224) p 0.5,
  horizontal flip p 0.5, normalisation: the former host-side `moco_view`, which
  cropped the original image, up to the resampling through the cache.
* `view_key` / `batch_views`: every random choice comes from a key folding the run
  seed with the step, the example's row in the global batch and the view number, so
  the pixels depend only on (seed, step, global row, view): not on the number of
  devices nor on how the batch is sharded, and a resumed run redraws the same views.

The MoCo cache side, `S = moco_side(size)` = 384 for 224 (`round(size * 384 / 224)`).
A MoCo crop may be as small as 45% of the original's side, so its view resolves the
original's pixels (a 500-pixel-wide image: 224 output pixels across 224 original
ones); a cache of `S` squeezes the whole image into `S` pixels and then upsamples its
crop. Measured by `bench/moco_side.py` (64 synthetic 500 x 375 photo-like images, 16
MoCo boxes each; the view from the cache vs the box of the original resized by PIL;
mean and 99th percentile absolute error in /255, and the mean's excess over a 1024
cache's, which is what no side removes: the cache's own bilinear interpolation blurs
texture finer than its pixels):

    S     texture: mean  p99  excess | i.i.d. noise: mean  p99  excess | bytes/image
    224            3.83 13.6   2.38  |               5.01 18.6   2.45  |   150,528
    256            3.38 12.2   1.94  |               4.67 17.7   2.12  |   196,608
    320            2.71  9.96  1.27  |               4.04 16.0   1.49  |   307,200
    384            2.26  8.39  0.82  |               3.51 14.3   0.96  |   442,368
    448            2.01  7.38  0.57  |               3.18 13.0   0.63  |   602,112
    512            1.84  6.72  0.40  |               2.96 12.0   0.41  |   786,432
    640            1.66  5.89  0.21  |               2.76 11.1   0.21  | 1,228,800
    1024           1.44  4.99  0     |               2.56 10.2   0     | 3,145,728

(texture: a smooth colour field plus random fields of 2-32 pixel cells; i.i.d. noise
of std 12 per pixel, a worst case.) No side brings the mean under 1/255 (even 1024
leaves 1.4/255), and the returns diminish while the bytes grow: the mean gains 0.67,
0.45, 0.25, 0.17 /255 per 64 pixels from 256 to 512. The rule is the smallest side
whose excess is under 1/255: 384 on both textures (442 kB per image, 2.25 times the
256 cache of the reference views).

Inside, the views keep the channels first (`[3, H, W]`: every colour op is a pass
over three contiguous planes) and end with one transpose. The MoCo views of
`bench/input.py` (2 x 32 views of 112 from a 192 cache, 2 CPU cores) went from about
129 ms to 30 ms through these choices, each of which XLA's CPU backend rewards:
* rows resampled by gathered taps rather than a `[size, S]` product (12 vs 35 ms);
* the colour passes and the blur's two passes run as `fori_loop`s, whose carries are
  stored once: left unrolled, XLA fuses the chain and computes each earlier pass
  again for every later one that reads it (the channel-mixing colour passes 3x over,
  the blur's first pass once per tap of the second); `optimization_barrier` does not
  stop it, as the CPU backend removes barriers before fusion;
* the hue's remainder as a floor and its three channels as one broadcast expression
  (a float remainder, or three stacked channels with a per-example shift, ran 5-8x
  slower);
* the blur as sums of shifted slices, not band-matrix products.
On accelerators these are neutral or better (fewer flops, no change in layout).

Outputs are float32, normalised with the ImageNet mean and std (`MEAN_RGB`,
`STD_RGB`, defined once in `bitune_jax.data.pipeline`, which imports this module only
inside `make_views`).
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from bitune_jax.data.pipeline import MEAN_RGB, STD_RGB

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2
DEFAULT_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
JITTER_FOLD = 2  # reference views: the jitter key is jax.random.fold_in(key, 2)


def normalize(image: jax.Array) -> jax.Array:
  """float `[..., 3]` in [0, 1] -> (x - mean) / std, float32."""
  mean = jnp.asarray(MEAN_RGB, jnp.float32)
  std = jnp.asarray(STD_RGB, jnp.float32)
  return (image.astype(jnp.float32) - mean) / std


def crop_box(key: jax.Array, height: int | jax.Array, width: int | jax.Array, *,
             scale: tuple[float, float] = (0.08, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3),
             attempts: int = 10) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`(top, left, h, w)` int32 scalars of a random resized crop of `height x width`.

  torchvision's RandomResizedCrop rule without branches (see the module docstring);
  `height` and `width` may be Python ints or traced scalars.
  """
  area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
  height = jnp.asarray(height, jnp.int32)
  width = jnp.asarray(width, jnp.int32)
  height_f, width_f = height.astype(jnp.float32), width.astype(jnp.float32)
  area = height_f * width_f * jax.random.uniform(
      area_key, (attempts,), jnp.float32, scale[0], scale[1])
  aspect = jnp.exp(jax.random.uniform(ratio_key, (attempts,), jnp.float32,
                                      math.log(ratio[0]), math.log(ratio[1])))
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
  first = jnp.argmax(fits)  # the first True (0 when there is none)
  any_fit = fits[first]
  # Fallback: torchvision's centre crop, the aspect ratio clamped to `ratio`.
  in_ratio = width_f / height_f
  low, high = min(ratio), max(ratio)
  fb_h = jnp.where(in_ratio < low, jnp.round(width_f / low).astype(jnp.int32), height)
  fb_w = jnp.where(in_ratio > high, jnp.round(height_f * high).astype(jnp.int32), width)
  box_h = jnp.where(any_fit, h[first], fb_h)
  box_w = jnp.where(any_fit, w[first], fb_w)
  # randint's range is empty when the candidate does not fit; its draw is unused then.
  top = jax.random.randint(top_key, (), 0, jnp.maximum(height - box_h + 1, 1))
  left = jax.random.randint(left_key, (), 0, jnp.maximum(width - box_w + 1, 1))
  top = jnp.where(any_fit, top, (height - box_h) // 2)
  left = jnp.where(any_fit, left, (width - box_w) // 2)
  return (top.astype(jnp.int32), left.astype(jnp.int32), box_h.astype(jnp.int32),
          box_w.astype(jnp.int32))


def _resize_weights(start, length, size, side):
  """`[size, side]` float32: row i resamples pixels `[start, start + length)` of an
  axis of `side` pixels at output pixel i (triangle filter, antialiased)."""
  length_f = length.astype(jnp.float32)
  factor = length_f / size  # input pixels per output pixel
  support_scale = jnp.maximum(factor, 1.0)
  output = jnp.arange(size, dtype=jnp.float32)
  centre = start.astype(jnp.float32) + (output + 0.5) * factor
  pixel = jnp.arange(side)
  distance = (pixel.astype(jnp.float32) + 0.5)[None, :] - centre[:, None]
  weights = jnp.maximum(1.0 - jnp.abs(distance) / support_scale, 0.0)
  inside = (pixel >= start) & (pixel < start + length)
  weights = jnp.where(inside[None, :], weights, 0.0)
  # The nearest pixel of the box always weighs >= 1/2, so no row sums to zero.
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def _resize_taps(start, length, size, side):
  """The nonzero part of `_resize_weights`: `(index, weights)`, int32 and float32
  `[size, T]`, output pixel i being `sum_t weights[i, t] * x[index[i, t]]`.

  A box of an axis of `side` pixels is at most `side` long, so the triangle's support
  spans fewer than `2 * max(side / size, 1) + 1` pixels: T = that, rounded up, plus one
  (a first tap that may fall just outside the support, at zero weight).
  """
  taps = math.ceil(2 * max(side / size, 1.0)) + 2
  length_f = length.astype(jnp.float32)
  factor = length_f / size
  support_scale = jnp.maximum(factor, 1.0)
  centre = start.astype(jnp.float32) + (jnp.arange(size, dtype=jnp.float32) + 0.5) * factor
  # The first pixel whose centre can be inside the support, or the box's first pixel.
  first = jnp.maximum(jnp.floor(centre - support_scale - 0.5).astype(jnp.int32), start)
  pixel = first[:, None] + jnp.arange(taps)[None, :]
  distance = (pixel.astype(jnp.float32) + 0.5) - centre[:, None]
  weights = jnp.maximum(1.0 - jnp.abs(distance) / support_scale, 0.0)
  weights = jnp.where(pixel < start + length, weights, 0.0)
  weights = weights / jnp.sum(weights, axis=1, keepdims=True)
  return jnp.clip(pixel, 0, side - 1), weights


def _crop_and_resize_planes(image_u8, top, left, h, w, *, size, mirror=False):
  """`crop_and_resize` with channels first: float32 `[3, size, size]` in [0, 1].

  Rows: each output row is a weighted sum of the few cache rows under its triangle
  (`_resize_taps`: whole rows gathered, ~T * size * S * 3 multiply-adds instead of a
  `[size, S]` matrix product's size * S * S * 3, the costlier of the two passes).
  Columns: a `[size, S]` weight matrix product.
  """
  index, weights = _resize_taps(jnp.asarray(top, jnp.int32), jnp.asarray(h, jnp.int32),
                                size, image_u8.shape[0])
  cols = _resize_weights(jnp.asarray(left, jnp.int32), jnp.asarray(w, jnp.int32), size,
                         image_u8.shape[1])
  cols = jnp.where(mirror, cols[::-1], cols)  # mirrored output columns: a flip, for free
  planes_u8 = _channels_first(image_u8)
  rows = sum(weights[None, :, t, None] * planes_u8[:, index[:, t]].astype(jnp.float32)
             for t in range(index.shape[1]))  # [3, size, S], in 0..255
  # The operands in this order make the product's natural layout [3, size, size]: a
  # transposed result would be copied by every elementwise op after it.
  # HIGHEST: accelerators otherwise multiply float32 at reduced (bf16 / tf32) precision.
  out = jnp.einsum("ciw,jw->cij", rows, cols / 255.0,
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.clip(out, 0.0, 1.0)


def crop_and_resize(image_u8: jax.Array, top: int | jax.Array, left: int | jax.Array,
                    h: int | jax.Array, w: int | jax.Array, *, size: int,
                    mirror: bool | jax.Array = False) -> jax.Array:
  """Box `[top, top + h) x [left, left + w)` of uint8 `[S, S, 3]` resampled to float32
  `[size, size, 3]` in [0, 1]: bilinear, antialiased when shrinking (as PIL's bilinear
  resize of the cropped box). The box may be traced; `S` and `size` are static.
  `mirror` (may be traced): the result flipped left-right, by the weights."""
  return _channels_last(_crop_and_resize_planes(image_u8, top, left, h, w, size=size,
                                                mirror=mirror))


def _channels_first(image):
  return jnp.transpose(image, (2, 0, 1))


def _channels_last(planes):
  return jnp.transpose(planes, (1, 2, 0))


# ---------------------------------------------------------------------- colour


def grayscale(image: jax.Array) -> jax.Array:
  """ITU-R 601-2 luma of float `[H, W, 3]`: `[H, W, 1]` (0.299 R + 0.587 G + 0.114 B,
  PIL's "L" and torchvision's coefficients)."""
  luma = jnp.asarray(LUMA, jnp.float32)
  return jnp.sum(image * luma, axis=-1, keepdims=True)


def _grey_planes(planes):
  """`grayscale` of `[3, H, W]`: `[1, H, W]`."""
  return (LUMA[0] * planes[0] + LUMA[1] * planes[1] + LUMA[2] * planes[2])[None]


def _rotate_hue(planes, shift):
  """float `[3, H, W]` in [0, 1] with its hue rotated by `shift` turns (RGB -> HSV ->
  RGB; saturation and value kept)."""
  r, g, b = planes[0], planes[1], planes[2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  chroma = value - jnp.minimum(jnp.minimum(r, g), b)  # = saturation * value
  inverse = jnp.where(chroma > 0, 1.0 / jnp.where(chroma > 0, chroma, 1.0), 0.0)
  # Hue in sixths of the circle: the sector of the largest channel, then the offset (0
  # for a grey pixel); then rotated.
  sixths = jnp.where(value == r, (g - b) * inverse,
                     jnp.where(value == g, 2.0 + (b - r) * inverse,
                               4.0 + (r - g) * inverse)) + 6.0 * shift
  # Back to RGB: channel n (R, G, B: n = 5, 3, 1) is v - c * clip(min(k, 4 - k), 0, 1)
  # with k = (n + sixths) mod 6. (Written with a floor, not a float remainder, and for
  # the three channels at once, not stacked: XLA's CPU backend runs both forms 5-8x
  # slower.)
  k = jnp.asarray([5.0, 3.0, 1.0], jnp.float32)[:, None, None] + sixths[None]
  k = k - 6.0 * jnp.floor(k * (1.0 / 6.0))
  return value[None] - chroma[None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_colour(image: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
  """torchvision's ColorJitter given its draws, on float `[H, W, 3]` in [0, 1] (see
  `_adjust_colour`)."""
  return _channels_last(_adjust_colour(_channels_first(image), factors, order,
                                       active=True))


def _affine_passes(planes, coefficients):
  """`x <- clip(a x + b grey(x) + c mean(grey(x)), 0, 1)` for each row (a, b, c) of
  float `[n, 3]` in turn, on float `[3, H, W]`.

  A loop, so that each pass's result is stored once: the passes mix the channels, and
  XLA's CPU backend, left to fuse the unrolled chain, computes every earlier pass again
  for each later one that reads it (7 passes then ran 3x slower than alone).
  """
  def one(i, x):
    a, b, c = coefficients[i, 0], coefficients[i, 1], coefficients[i, 2]
    grey = _grey_planes(x)
    return jnp.clip(a * x + b * grey + c * jnp.mean(grey), 0.0, 1.0)
  return jax.lax.fori_loop(0, coefficients.shape[0], one, planes)


def _adjust_colour(planes, factors, order, *, active, grey=False):
  """torchvision's ColorJitter given its draws, on float `[3, H, W]` in [0, 1] (channels
  first: every op is then a pass over three contiguous planes), where `active` (may be
  traced); else the image unchanged. Then, where `grey` (may be traced), the grayscale
  (ITU-R 601-2 luma in all three channels).

  Args:
    planes: float `[3, H, W]` in [0, 1].
    factors: `[4]`: brightness, contrast and saturation factors, hue shift (turns).
    order: int `[4]`, a permutation of 0..3 (may be traced): op `order[i]` is applied
      i-th. Op 0, brightness: `f0 * x`; 1, contrast: `f1 * x + (1 - f1) *
      mean(grayscale(x))`; 2, saturation: `f2 * x + (1 - f2) * grayscale(x)`; 3, hue:
      the hue rotated by `f3` of the colour circle. Each result is clipped to [0, 1].
    active: jitter or not.
    grey: grayscale after the jitter or not.

  Returns:
    float32 `[3, H, W]` in [0, 1].
  """
  factors = jnp.asarray(factors, jnp.float32)
  order = jnp.asarray(order, jnp.int32)
  one, zero = jnp.float32(1), jnp.float32(0)
  jittering = jnp.asarray(active)  # False: the image itself (every map the identity)

  def cheap(op, here):
    """(a, b, c) of op `op` (0 brightness, 1 contrast, 2 saturation) if `here` (and
    jittering), else of the identity: the scalars are picked per op, not the images (a
    select of three images per position would cost three times the memory traffic)."""
    on = here & jittering
    a = jnp.where(on, factors[jnp.minimum(op, 2)], one)
    b = jnp.where(on & (op == 2), 1 - factors[2], zero)
    c = jnp.where(on & (op == 1), 1 - factors[1], zero)
    return jnp.stack([a, b, c])

  # The hue rotation (the costly op) is computed once, at its place in the order: the
  # cheap ops before it, the hue, the cheap ops after it. (A switch per position would,
  # under vmap, compute all four ops at all four positions.)
  hue_at = jnp.argmax(order == 3)
  before = jnp.stack([cheap(order[i], i < hue_at) for i in range(3)])  # positions 0..2
  after = [cheap(order[i], i > hue_at) for i in range(1, 4)]  # positions 1..3
  # The grayscale is the saturation with factor 0: grey(x) in every channel.
  greying = jnp.asarray(grey)
  after.append(jnp.stack([jnp.where(greying, zero, one), jnp.where(greying, one, zero),
                          zero]))
  planes = _affine_passes(planes.astype(jnp.float32), before)
  planes = jnp.where(jittering, jnp.clip(_rotate_hue(planes, factors[3]), 0.0, 1.0),
                     planes)
  return _affine_passes(planes, jnp.stack(after))


def jitter_draws(key: jax.Array, strength: Sequence[float] = DEFAULT_JITTER
                 ) -> tuple[jax.Array, jax.Array]:
  """`(factors [4] float32, order [4] int32)` of ColorJitter with `strength` (b, c, s,
  h): brightness, contrast, saturation ~ U[max(0, 1 - v), 1 + v], hue shift ~ U[-h, h],
  the order a uniformly random permutation of 0..3 (keys `jax.random.split(key, 5)`:
  one per factor, then the order)."""
  keys = jax.random.split(key, 5)
  bounds = [(max(0.0, 1 - v), 1 + v) for v in strength[:3]]
  bounds.append((-strength[3], strength[3]))
  factors = jnp.stack([jax.random.uniform(k, (), jnp.float32, low, high)
                       for k, (low, high) in zip(keys[:4], bounds)])
  order = jax.random.permutation(keys[4], 4).astype(jnp.int32)
  return factors, order


def color_jitter(image: jax.Array, key: jax.Array, *,
                 strength: Sequence[float] = DEFAULT_JITTER) -> jax.Array:
  """torchvision's ColorJitter on float `[H, W, 3]` in [0, 1]: `jitter_draws(key,
  strength)`, then `adjust_colour`."""
  factors, order = jitter_draws(key, strength)
  return adjust_colour(image, factors, order)


# ------------------------------------------------------------------------ blur


def _blur_taps(sigma, kernel_size):
  """`[kernel_size]` float32: the Gaussian of `sigma` sampled at -r..r, normalised."""
  radius = kernel_size // 2
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * jnp.square(taps / sigma))
  return kernel / jnp.sum(kernel)


_NO_BLUR = 1e-3  # a sigma whose normalised taps are exactly (0, ..., 1, ..., 0)


def _blur_planes(planes, sigma, *, kernel_size, apply=True):
  """`gaussian_blur` of float `[C, H, W]` (channels first)."""
  if kernel_size % 2 != 1:
    raise ValueError(f"kernel_size must be odd, got {kernel_size}")
  radius = kernel_size // 2
  sigma = jnp.asarray(sigma, jnp.float32)
  if apply is not True:  # a traced decision: the taps of the identity where not
    sigma = jnp.where(apply, sigma, _NO_BLUR)
  kernel = _blur_taps(sigma, kernel_size)

  def along(axis):
    """The blur of `[C, H, W]` along `axis` (1: rows, 2: columns): a sum of k shifted
    slices of the reflect-padded image (k multiply-adds per pixel, rather than a
    band-matrix product's n + k - 1)."""
    def blur(x):
      pad = [(0, 0)] * 3
      pad[axis] = (radius, radius)
      padded = jnp.pad(x, pad, mode="reflect")
      n = x.shape[axis]
      return sum(kernel[t] * jax.lax.slice_in_dim(padded, t, t + n, axis=axis)
                 for t in range(kernel_size))
    return blur

  # The two passes as a loop whose body picks the axis by the (unbatched) iteration
  # number, so that the first pass is stored once: XLA's CPU backend, left to fuse
  # them, computes the first again for each of the k taps of the second (5x slower;
  # a loop of (blur the rows, transpose) takes twice this one's time).
  return jax.lax.fori_loop(
      0, 2, lambda i, x: jax.lax.cond(i == 0, along(1), along(2), x),
      planes.astype(jnp.float32))


def gaussian_blur(image: jax.Array, sigma: float | jax.Array, *,
                  kernel_size: int, apply: bool | jax.Array = True) -> jax.Array:
  """Separable Gaussian blur of float `[H, W, C]` with reflected borders.

  `kernel_size` (odd, static) taps of a Gaussian of `sigma` (may be traced), normalised
  to sum 1, as torchvision's `gaussian_blur`; the borders are reflected without
  repeating the edge pixel (`d c b | a b c d | c b a`, torch's and NumPy's "reflect",
  SciPy's "mirror"), as often as needed for images smaller than the kernel.

  `apply` (may be traced) False gives the image itself (taps (0, ..., 1, ..., 0)).

  Returns:
    float32 `[H, W, C]`.
  """
  return _channels_last(_blur_planes(_channels_first(image), sigma,
                                     kernel_size=kernel_size, apply=apply))


def blur_kernel_size(size: int) -> int:
  """Taps of the MoCo v2 / SimCLR blur of a `size` view: about a tenth of the side, odd,
  at least 3 (23 at 224, as MoCo v2's former host-side view)."""
  return max(3, int(0.1 * size) // 2 * 2 + 1)


# ----------------------------------------------------------------------- views


def reference_train_view(image_u8: jax.Array, key: jax.Array, *, size: int,
                         scale: tuple[float, float] = (0.08, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3),
                         flip: bool = True,
                         jitter: Sequence[float] | None = None) -> jax.Array:
  """The reference training view of uint8 `[S, S, 3]`: random resized crop (`crop_box`
  on the `S x S` image, `crop_and_resize` to `size`), horizontal flip with p 0.5,
  optional colour jitter, normalisation; float32 `[size, size, 3]`.

  Args:
    image_u8: uint8 `[S, S, 3]` cache image.
    key: the view's key: crop and flip keys are `jax.random.split(key)`, the jitter
      key is `jax.random.fold_in(key, JITTER_FOLD)` (so the jitter leaves the crop
      and flip of a view unchanged).
    size: output side (static).
    scale: area range of the crop.
    ratio: aspect (w / h) range of the crop.
    flip: False: never flip.
    jitter: None, or (brightness, contrast, saturation, hue) strengths of
      `color_jitter`, applied after the flip (as the former host-side train view).
  """
  crop_key, flip_key = jax.random.split(key)
  side_h, side_w = image_u8.shape[0], image_u8.shape[1]
  top, left, h, w = crop_box(crop_key, side_h, side_w, scale=scale, ratio=ratio)
  # The flip (p 0.5) is made by the crop's weights.
  mirror = jax.random.bernoulli(flip_key, 0.5) if flip else False
  planes = _crop_and_resize_planes(image_u8, top, left, h, w, size=size, mirror=mirror)
  if jitter is not None:
    factors, order = jitter_draws(jax.random.fold_in(key, JITTER_FOLD), tuple(jitter))
    planes = _adjust_colour(planes, factors, order, active=True)
  return normalize(_channels_last(planes))


def eval_view(image_u8: jax.Array, *, size: int) -> jax.Array:
  """The centre `size x size` of uint8 `[S, S, 3]` (top = left = (S - size) // 2), no
  resampling; float32, normalised."""
  top = (image_u8.shape[0] - size) // 2
  left = (image_u8.shape[1] - size) // 2
  crop = image_u8[top:top + size, left:left + size]
  return normalize(crop.astype(jnp.float32) / 255.0)


def moco_side(size: int) -> int:
  """The side `S` of the uint8 cache that MoCo views of `size` are cut from: 384 for
  224 (`round(size * 384 / 224)`), the smallest side measured whose error exceeds that
  of a 1024 cache by under 1/255 (`bench/moco_side.py`; the module docstring)."""
  return int(round(size * 384 / 224))


def moco_box(key: jax.Array, hw: jax.Array, side: int, *,
             scale: tuple[float, float] = (0.2, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)
             ) -> tuple[jax.Array, jax.Array]:
  """The MoCo crop of an image of original size `hw`, on its `side x side` cache.

  Args:
    key: the crop's key (`crop_box`'s).
    hw: int `[2]` (height, width) of the original image (may be traced).
    side: the cache's side `S` (static).
    scale: area range of the crop, as a fraction of the original image.
    ratio: aspect (w / h) range, in the original image's pixels.

  Returns:
    `(original, cache)`, int32 `[4]` boxes (top, left, h, w): `crop_box` on the
    original `height x width`, and that box mapped onto the cache (rows times
    `S / height`, columns times `S / width`, both ends rounded; at least one pixel,
    inside the cache).
  """
  hw = jnp.asarray(hw, jnp.int32)
  box = jnp.stack(crop_box(key, hw[0], hw[1], scale=scale, ratio=ratio))
  factor = side / hw.astype(jnp.float32)  # [2]: cache pixels per original pixel

  def to_cache(v, axis):
    return jnp.round(v.astype(jnp.float32) * factor[axis]).astype(jnp.int32)

  starts, ends = [], []
  for axis in range(2):
    start = jnp.minimum(to_cache(box[axis], axis), side - 1)
    end = jnp.clip(to_cache(box[axis] + box[axis + 2], axis), start + 1, side)
    starts.append(start)
    ends.append(end)
  cache = jnp.stack([starts[0], starts[1], ends[0] - starts[0], ends[1] - starts[1]])
  return box, cache


def moco_view(image_u8: jax.Array, hw: jax.Array, key: jax.Array, *, size: int,
              scale: tuple[float, float] = (0.2, 1.0),
              ratio: tuple[float, float] = (3 / 4, 4 / 3),
              jitter: Sequence[float] = DEFAULT_JITTER, jitter_p: float = 0.8,
              grayscale_p: float = 0.2, blur_p: float = 0.5,
              blur_sigma: tuple[float, float] = (0.1, 2.0),
              flip: bool = True) -> jax.Array:
  """A MoCo v2 view of an image from its uint8 `[S, S, 3]` cache.

  Random resized crop (`moco_box`: area `scale` of the original `hw` image, aspect in
  its pixels) resampled to `size`, colour jitter with p `jitter_p`, grayscale
  (replicated to 3 channels) with p `grayscale_p`, Gaussian blur of sigma ~
  U(blur_sigma) with `blur_kernel_size(size)` taps with p `blur_p`, horizontal flip
  with p 0.5 (never if not `flip`), normalisation. The keys are `jax.random.split(key,
  7)`: crop, jitter or not, jitter draws, grayscale or not, sigma, blur or not, flip or
  not (each yes / no is `jax.random.bernoulli(k, p)`).

  Args:
    image_u8: uint8 `[S, S, 3]`, the original image resized to `S x S`.
    hw: int `[2]`, the original (height, width) (may be traced).
    key: the view's key.
    size: output side (static).
    scale, ratio, jitter, jitter_p, grayscale_p, blur_p, blur_sigma, flip: as above
      (static).

  Returns:
    float32 `[size, size, 3]`, normalised.
  """
  keys = jax.random.split(key, 7)
  _, box = moco_box(keys[0], hw, image_u8.shape[0], scale=scale, ratio=ratio)
  # The flip is drawn last but made first, by the crop's weights: jitter, grayscale and
  # the (symmetric, reflect-bordered) blur commute with it. The decisions pick small
  # things (factors, band matrices) rather than whole images, so nothing is computed
  # twice.
  mirror = jax.random.bernoulli(keys[6], 0.5) if flip else False
  planes = _crop_and_resize_planes(image_u8, box[0], box[1], box[2], box[3], size=size,
                                   mirror=mirror)
  jittered = jax.random.bernoulli(keys[1], jitter_p)
  factors, order = jitter_draws(keys[2], tuple(jitter))
  planes = _adjust_colour(planes, factors, order, active=jittered,
                          grey=jax.random.bernoulli(keys[3], grayscale_p))
  sigma = jax.random.uniform(keys[4], (), jnp.float32, blur_sigma[0], blur_sigma[1])
  planes = _blur_planes(planes, sigma, kernel_size=blur_kernel_size(size),
                        apply=jax.random.bernoulli(keys[5], blur_p))
  return normalize(_channels_last(planes))


def view_key(seed: int | jax.Array, step: int | jax.Array, row: int | jax.Array,
             view: int | jax.Array) -> jax.Array:
  """The key of one view: `jax.random.key(seed)` folded with the step, the example's
  row in the global batch, then the view number."""
  key = jax.random.key(seed)
  for part in (step, row, view):
    key = jax.random.fold_in(key, part)
  return key


def batch_views(images_u8: jax.Array, *, seed: int | jax.Array, step: int | jax.Array,
                rows: jax.Array, view: int, size: int, kind: str = "reference",
                hw: jax.Array | None = None, scale: tuple[float, float] | None = None,
                flip: bool = True,
                jitter: Sequence[float] | None = None) -> jax.Array:
  """A view of each uint8 `[B, S, S, 3]` image, each with its own key
  `view_key(seed, step, rows[b], view)`.

  Args:
    images_u8: uint8 `[B, S, S, 3]` cache images.
    seed, step: the run's seed and the step (may be traced).
    rows: int `[B]`, each image's row in the global batch.
    view: the view number (0, 1: query, key).
    size: output side (static).
    kind: "reference" (`reference_train_view`) or "moco" (`moco_view`).
    hw: int `[B, 2]` original (height, width) of each image: needed by "moco", unused
      by "reference".
    scale: area range of the crop; None: the kind's default ((0.08, 1) reference,
      (0.2, 1) moco).
    flip: False: never flip.
    jitter: colour jitter strengths (b, c, s, h). Reference: None, no jitter. MoCo:
      None, `DEFAULT_JITTER` (applied with p 0.8).

  Returns:
    float32 `[B, size, size, 3]`, normalised.
  """
  if kind not in ("reference", "moco"):
    raise ValueError(f"kind must be 'reference' or 'moco', got {kind!r}")
  if kind == "moco" and hw is None:
    raise ValueError("moco views need the original image sizes hw [B, 2]")
  if kind == "reference":
    options = dict(size=size, scale=scale or (0.08, 1.0), flip=flip, jitter=jitter)

    def one(image, row):
      return reference_train_view(image, view_key(seed, step, row, view), **options)
    return jax.vmap(one)(images_u8, rows)
  options = dict(size=size, scale=scale or (0.2, 1.0), flip=flip,
                 jitter=DEFAULT_JITTER if jitter is None else jitter)

  def one_moco(image, image_hw, row):
    return moco_view(image, image_hw, view_key(seed, step, row, view), **options)
  return jax.vmap(one_moco)(images_u8, jnp.asarray(hw, jnp.int32), rows)
