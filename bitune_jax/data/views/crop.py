"""Crops on the accelerator, inside `jax.jit`, from a uint8 cache `[S, S, 3]`.

* `crop_box`: torchvision's RandomResizedCrop box, branch-free: `attempts` candidates
  (area fraction U(scale), log-uniform aspect w/h in `ratio`, `w = round(sqrt(area *
  aspect))`, `h = round(sqrt(area / aspect))`) are drawn at once and the first that
  fits is placed uniformly (integer top / left); if none fits, the centre crop of the
  whole image with its aspect ratio clamped to `ratio`.
* `crop_and_resize`: the box resampled to `size x size`, bilinear with antialiasing
  when shrinking (PIL's and torchvision's `antialias=True` triangle filter: support
  scaled by the shrink factor, sampled at pixel centres, weights renormalised, only
  pixels of the box taken, as torchvision crops before it resizes): the rows as
  weighted sums of the few cache rows under each output row's triangle (gathered
  taps: on XLA's CPU backend a third of the time of a `[size, S]` product), the
  columns as a product with a `[size, S]` weight matrix built for the (traced) box.
* `eval_view`: the centre `size x size` of the cache image; `normalize`: the ImageNet
  mean and std (`MEAN_RGB`, `STD_RGB`, which the host-side evaluation batches of
  `bitune_jax.data.pipeline` use too); `eval_resize`: the cache side of the reference
  views.

Inside, images are kept channels first (`[3, H, W]`, `channels_first`): every colour op
of `bitune_jax.data.views.colour` is then a pass over three contiguous planes, and a
view ends with one transpose (`channels_last`).
"""

import math

import jax
import jax.numpy as jnp

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)


def eval_resize(size: int) -> int:
  """The cache side S for views of `size` (256 for 224, the papers' ratio: the
  reference's `Resize((256, 256))` before `RandomResizedCrop(224)`)."""
  return int(round(size * 256 / 224))


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


def crop_and_resize_planes(image_u8: jax.Array, top: int | jax.Array,
                           left: int | jax.Array, h: int | jax.Array,
                           w: int | jax.Array, *, size: int,
                           mirror: bool | jax.Array = False) -> jax.Array:
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
  planes_u8 = channels_first(image_u8)
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
  return channels_last(crop_and_resize_planes(image_u8, top, left, h, w, size=size,
                                                mirror=mirror))


def channels_first(image: jax.Array) -> jax.Array:
  """`[H, W, C]` -> `[C, H, W]`."""
  return jnp.transpose(image, (2, 0, 1))


def channels_last(planes: jax.Array) -> jax.Array:
  """`[C, H, W]` -> `[H, W, C]`."""
  return jnp.transpose(planes, (1, 2, 0))



def eval_view(image_u8: jax.Array, *, size: int) -> jax.Array:
  """The centre `size x size` of uint8 `[S, S, 3]` (top = left = (S - size) // 2), no
  resampling; float32, normalised."""
  top = (image_u8.shape[0] - size) // 2
  left = (image_u8.shape[1] - size) // 2
  crop = image_u8[top:top + size, left:left + size]
  return normalize(crop.astype(jnp.float32) / 255.0)
