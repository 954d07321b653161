"""The training views of one image on the accelerator: the reference view and MoCo v2's.

* `reference_train_view`: crop box (`crop.crop_box` on the `S x S` cache image),
  crop-and-resize to `size`, horizontal flip with p 0.5 (or none), optional colour
  jitter, ImageNet normalisation.
* `moco_view` (MoCo v2): random resized crop of area 0.2-1 drawn in the ORIGINAL
  image's pixels (`moco_box`: `crop_box` on its `hw`, then mapped onto the `S x S`
  cache), resampled to `size`, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale
  p 0.2, Gaussian blur (sigma 0.1-2, `blur_kernel_size(size)` taps: 23 at 224) p 0.5,
  horizontal flip p 0.5, normalisation: the crop of the original image, up to the
  resampling through the cache.

Each takes one key; `bitune_jax.data.views.batch` gives every example its own.

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
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from bitune_jax.data.views.colour import (DEFAULT_JITTER, adjust_colour_planes,
                                          blur_kernel_size, blur_planes, jitter_draws)
from bitune_jax.data.views.crop import (channels_last, crop_and_resize_planes, crop_box,
                                        normalize)

JITTER_FOLD = 2  # reference views: the jitter key is jax.random.fold_in(key, 2)


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
      `color_jitter`, applied after the flip.
  """
  crop_key, flip_key = jax.random.split(key)
  side_h, side_w = image_u8.shape[0], image_u8.shape[1]
  top, left, h, w = crop_box(crop_key, side_h, side_w, scale=scale, ratio=ratio)
  # The flip (p 0.5) is made by the crop's weights.
  mirror = jax.random.bernoulli(flip_key, 0.5) if flip else False
  planes = crop_and_resize_planes(image_u8, top, left, h, w, size=size, mirror=mirror)
  if jitter is not None:
    factors, order = jitter_draws(jax.random.fold_in(key, JITTER_FOLD), tuple(jitter))
    planes = adjust_colour_planes(planes, factors, order, active=True)
  return normalize(channels_last(planes))


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
  planes = crop_and_resize_planes(image_u8, box[0], box[1], box[2], box[3], size=size,
                                   mirror=mirror)
  jittered = jax.random.bernoulli(keys[1], jitter_p)
  factors, order = jitter_draws(keys[2], tuple(jitter))
  planes = adjust_colour_planes(planes, factors, order, active=jittered,
                          grey=jax.random.bernoulli(keys[3], grayscale_p))
  sigma = jax.random.uniform(keys[4], (), jnp.float32, blur_sigma[0], blur_sigma[1])
  planes = blur_planes(planes, sigma, kernel_size=blur_kernel_size(size),
                        apply=jax.random.bernoulli(keys[5], blur_p))
  return normalize(channels_last(planes))

