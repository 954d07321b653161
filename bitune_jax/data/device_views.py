"""Image views in JAX, made on the accelerator inside `jax.jit` from a uint8 cache.

The host-side views (`bitune_jax.data.views`, tf.data) decode and resize every image
on every step. These functions make the same reference views from a uint8 cache of
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
  pixels of the box taken, as torchvision crops before it resizes), as two matrix
  products with `[size, S]` weight matrices built for the (traced) box.
* `reference_train_view`: crop box, crop-and-resize, horizontal flip with p 0.5,
  ImageNet normalisation. `eval_view`: the centre `size x size` of the cache image.
* `view_key` / `batch_views`: every random choice comes from a key folding the run
  seed with the step, the example's row in the global batch and the view number, so
  the pixels depend only on (seed, step, global row, view): not on the number of
  devices nor on how the batch is sharded, and a resumed run redraws the same views.

Outputs are float32, normalised with the ImageNet mean and std (`MEAN_RGB`,
`STD_RGB`, the same as `bitune_jax.data.views`, repeated here so that this module
does not import TensorFlow).
"""

import math

import jax
import jax.numpy as jnp

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)


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


def crop_and_resize(image_u8: jax.Array, top: int | jax.Array, left: int | jax.Array,
                    h: int | jax.Array, w: int | jax.Array, *, size: int) -> jax.Array:
  """Box `[top, top + h) x [left, left + w)` of uint8 `[S, S, 3]` resampled to float32
  `[size, size, 3]` in [0, 1]: bilinear, antialiased when shrinking (as PIL's bilinear
  resize of the cropped box). The box may be traced; `S` and `size` are static."""
  rows = _resize_weights(jnp.asarray(top, jnp.int32), jnp.asarray(h, jnp.int32), size,
                         image_u8.shape[0])
  cols = _resize_weights(jnp.asarray(left, jnp.int32), jnp.asarray(w, jnp.int32), size,
                         image_u8.shape[1])
  image = image_u8.astype(jnp.float32) / 255.0
  # HIGHEST: accelerators otherwise multiply float32 at reduced (bf16 / tf32) precision.
  out = jnp.einsum("ih,hwc->iwc", rows, image, precision=jax.lax.Precision.HIGHEST)
  out = jnp.einsum("jw,iwc->ijc", cols, out, precision=jax.lax.Precision.HIGHEST)
  return jnp.clip(out, 0.0, 1.0)


def reference_train_view(image_u8: jax.Array, key: jax.Array, *, size: int,
                         scale: tuple[float, float] = (0.08, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
  """The reference training view of uint8 `[S, S, 3]`: random resized crop (`crop_box`
  on the `S x S` image, `crop_and_resize` to `size`), horizontal flip with p 0.5,
  normalisation; float32 `[size, size, 3]`."""
  crop_key, flip_key = jax.random.split(key)
  side_h, side_w = image_u8.shape[0], image_u8.shape[1]
  top, left, h, w = crop_box(crop_key, side_h, side_w, scale=scale, ratio=ratio)
  image = crop_and_resize(image_u8, top, left, h, w, size=size)
  flip = jax.random.bernoulli(flip_key, 0.5)
  image = jnp.where(flip, image[:, ::-1], image)
  return normalize(image)


def eval_view(image_u8: jax.Array, *, size: int) -> jax.Array:
  """The centre `size x size` of uint8 `[S, S, 3]` (top = left = (S - size) // 2), no
  resampling; float32, normalised."""
  top = (image_u8.shape[0] - size) // 2
  left = (image_u8.shape[1] - size) // 2
  crop = image_u8[top:top + size, left:left + size]
  return normalize(crop.astype(jnp.float32) / 255.0)


def view_key(seed: int | jax.Array, step: int | jax.Array, row: int | jax.Array,
             view: int | jax.Array) -> jax.Array:
  """The key of one view: `jax.random.key(seed)` folded with the step, the example's
  row in the global batch, then the view number."""
  key = jax.random.key(seed)
  for part in (step, row, view):
    key = jax.random.fold_in(key, part)
  return key


def batch_views(images_u8: jax.Array, *, seed: int | jax.Array, step: int | jax.Array,
                rows: jax.Array, view: int, size: int) -> jax.Array:
  """`reference_train_view` of each uint8 `[B, S, S, 3]` image with its own key
  `view_key(seed, step, rows[b], view)` (`rows`: `[B]` rows in the global batch);
  float32 `[B, size, size, 3]`."""
  def one(image, row):
    return reference_train_view(image, view_key(seed, step, row, view), size=size)
  return jax.vmap(one)(images_u8, rows)
