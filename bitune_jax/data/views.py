"""Image views in TensorFlow (tf.data maps): the papers' train, eval and MoCo v2 views.

Every random choice is stateless: a view is a pure function of the encoded image and a
seed `[2]` int64 (`example_seed` folds the run seed, the host, the step and the row into
one), so the query and key views of an image differ (their seeds differ by the view
number) yet come from the same image, and a resumed run redraws exactly the same views.

* `train_view` (the reference's training transform): resize to `resize x resize`
  (256 for 224 crops), random resized crop (area 0.08-1, aspect 3/4-4/3) to `size`,
  horizontal flip, optional colour jitter.
* `eval_view`: resize to `resize x resize`, centre crop `size` (256 -> 224).
* `moco_view` (MoCo v2): random resized crop (area 0.2-1) of the original image,
  colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2, Gaussian blur (sigma
  0.1-2) p 0.5, horizontal flip.

The crop box follows torchvision's RandomResizedCrop semantics (10 attempts at an area
fraction and a log-uniform aspect ratio, else a centre crop with the ratio clamped).
With a pre-resize the box is drawn on the `resize x resize` image and the original is
cropped at the same relative box and resized once: the same views up to one
resampling instead of two. Colour jitter follows torchvision's ColorJitter (brightness,
contrast, saturation, hue in a random order). Outputs are float32, normalised with the
ImageNet mean and std.
"""

import math
from collections.abc import Sequence

import tensorflow as tf

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)
DEFAULT_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue


def eval_resize(size: int) -> int:
  """The pre-crop side for `size` (256 for 224, the papers' ratio)."""
  return int(round(size * 256 / 224))


def example_seed(seed: int | Sequence[int] | tf.Tensor,
                 *parts: int | tf.Tensor) -> tf.Tensor:
  """`[2]` int64 seed folding `seed` (int or `[2]`) with each of `parts` (scalars)."""
  seed = tf.cast(seed, tf.int64)
  if seed.shape.rank == 0:
    seed = tf.stack([seed, tf.constant(0, tf.int64)])
  for part in parts:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(part, tf.int64))
  return seed


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded bytes (JPEG, PNG, ...) -> uint8 `[H, W, 3]`."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def normalize(image: tf.Tensor) -> tf.Tensor:
  """float `[..., 3]` in [0, 1] -> (x - mean) / std, float32."""
  return (tf.cast(image, tf.float32) - MEAN_RGB) / STD_RGB


def _resize(image, height, width):
  """Bilinear, antialiased when shrinking (as PIL), float32 in [0, 1]."""
  image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, [height, width],
                          method="bilinear", antialias=True)
  return tf.clip_by_value(image, 0.0, 1.0)


def random_resized_crop_box(
    seed: tf.Tensor, height: int | tf.Tensor, width: int | tf.Tensor, *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """`(y, x, h, w)` int32 of a random resized crop of a `height x width` image.

  torchvision's rule: for each attempt draw an area fraction U(scale) and a log-uniform
  aspect ratio w/h in `ratio`; the first box that fits is placed uniformly; if none
  fits, a centre crop of the whole image with its aspect ratio clamped to `ratio`.
  """
  height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area_seed, ratio_seed, place_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  area = height_f * width_f * tf.random.stateless_uniform(
      [attempts], area_seed, scale[0], scale[1])
  log_ratio = tf.random.stateless_uniform([attempts], ratio_seed, math.log(ratio[0]),
                                          math.log(ratio[1]))
  aspect = tf.exp(log_ratio)
  w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  # Fallback: the centre crop of torchvision (aspect clamped to the range).
  in_ratio = width_f / height_f
  fb_w = tf.where(in_ratio < ratio[0], width,
                  tf.where(in_ratio > ratio[1],
                           tf.cast(tf.round(height_f * ratio[1]), tf.int32), width))
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(width_f / ratio[0]), tf.int32),
                  height)
  any_fit = tf.reduce_any(fits)
  box_h = tf.where(any_fit, h[first], fb_h)
  box_w = tf.where(any_fit, w[first], fb_w)
  u = tf.random.stateless_uniform([2], place_seed)
  y_random = tf.cast(tf.floor(u[0] * tf.cast(height - box_h + 1, tf.float32)), tf.int32)
  x_random = tf.cast(tf.floor(u[1] * tf.cast(width - box_w + 1, tf.float32)), tf.int32)
  y = tf.where(any_fit, tf.minimum(y_random, height - box_h), (height - box_h) // 2)
  x = tf.where(any_fit, tf.minimum(x_random, width - box_w), (width - box_w) // 2)
  return y, x, box_h, box_w


def _crop_resize(image, seed, *, size, resize, scale):
  """A random resized crop of `image` (uint8) to `size x size`, float in [0, 1]."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  if resize:  # Box drawn on the resize x resize image, mapped back to the original.
    y, x, h, w = random_resized_crop_box(seed, resize, resize, scale=scale)
    to_h = lambda v: tf.cast(tf.round(tf.cast(v * height, tf.float32) / resize), tf.int32)
    to_w = lambda v: tf.cast(tf.round(tf.cast(v * width, tf.float32) / resize), tf.int32)
    y0, y1, x0, x1 = to_h(y), to_h(y + h), to_w(x), to_w(x + w)
    y1, x1 = tf.maximum(y1, y0 + 1), tf.maximum(x1, x0 + 1)
  else:
    y0, x0, h, w = random_resized_crop_box(seed, height, width, scale=scale)
    y1, x1 = y0 + h, x0 + w
  return _resize(image[y0:y1, x0:x1], size, size)


def _grayscale(image):
  """ITU-R 601-2 luma `[H, W, 1]` (torchvision's and PIL's coefficients)."""
  return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True)


def adjust_colour(image: tf.Tensor, factors: tf.Tensor | Sequence[float],
                  order: tf.Tensor | Sequence[int]) -> tf.Tensor:
  """Brightness, contrast, saturation (`factors[0:3]`) and hue shift (`factors[3]`)
  applied to float `[H, W, 3]` in [0, 1] in the order `order` (a permutation of 0..3
  naming those four), each clipped to [0, 1]: torchvision's ColorJitter given its draws.

  Brightness scales; contrast blends with the mean grey level; saturation blends with
  the grey image; hue rotates by a fraction of the colour circle.
  """
  ops = [
      lambda x: x * factors[0],
      lambda x: factors[1] * x + (1 - factors[1]) * tf.reduce_mean(_grayscale(x)),
      lambda x: factors[2] * x + (1 - factors[2]) * _grayscale(x),
      lambda x: tf.image.adjust_hue(x, factors[3]),
  ]
  for i in range(4):
    image = tf.switch_case(order[i], [lambda op=op: tf.clip_by_value(op(image), 0., 1.)
                                      for op in ops])
  return image


def jitter_draws(seed: tf.Tensor, strength: Sequence[float] = DEFAULT_JITTER
                 ) -> tuple[tf.Tensor, tf.Tensor]:
  """`(factors [4], order [4])` of ColorJitter: brightness, contrast, saturation ~
  U[max(0, 1 - v), 1 + v], hue shift ~ U[-v, v], and a random order."""
  b, c, s, hue = strength
  seeds = tf.random.experimental.stateless_split(seed, 5)
  factors = [tf.random.stateless_uniform([], seeds[i], max(0.0, 1 - v), 1 + v)
             for i, v in enumerate((b, c, s))]
  factors.append(tf.random.stateless_uniform([], seeds[3], -hue, hue))
  order = tf.argsort(tf.random.stateless_uniform([4], seeds[4]))
  return tf.stack(factors), tf.cast(order, tf.int32)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, *,
                 strength: Sequence[float] = DEFAULT_JITTER) -> tf.Tensor:
  """torchvision's ColorJitter on float `[H, W, 3]` in [0, 1] (`jitter_draws`, then
  `adjust_colour`)."""
  factors, order = jitter_draws(seed, strength)
  return adjust_colour(image, factors, order)


def _blur_matrix(size, kernel):
  """`[size, size]` matrix applying the 1-D `kernel` (odd length) along an axis with
  reflected borders (`REFLECT`: the edge pixel is not repeated)."""
  radius = (kernel.shape[0] - 1) // 2
  index = tf.range(size)[:, None] + tf.range(-radius, radius + 1)[None, :]  # [n, taps]
  period = tf.maximum(2 * (size - 1), 1)  # reflected as often as needed (tiny images)
  index = tf.math.floormod(index, period)
  index = tf.where(index > size - 1, period - index, index)
  return tf.einsum("nts,t->ns", tf.one_hot(index, size), kernel)


def gaussian_blur(image: tf.Tensor, sigma: float | tf.Tensor, *,
                  kernel_size: int) -> tf.Tensor:
  """Separable Gaussian blur of `[H, W, C]` with reflected borders: `kernel_size` taps
  of a normalised Gaussian of `sigma`, as two matrix products (faster than a
  depthwise convolution on CPUs)."""
  radius = kernel_size // 2
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(taps / sigma))
  kernel /= tf.reduce_sum(kernel)
  shape = tf.shape(image)
  rows = _blur_matrix(shape[0], kernel)
  cols = _blur_matrix(shape[1], kernel)
  out = tf.einsum("hk,kwc->hwc", rows, image)
  return tf.einsum("wk,hkc->hwc", cols, out)


def _maybe(seed, probability, fn, image):
  """`fn(image)` with `probability`, else `image`."""
  apply = tf.random.stateless_uniform([], seed) < probability
  return tf.cond(apply, lambda: fn(image), lambda: image)


def train_view(encoded: tf.Tensor, seed: tf.Tensor, *, size: int = 224,
               resize: int = 256, scale: tuple[float, float] = (0.08, 1.0),
               jitter: Sequence[float] | None = None) -> tf.Tensor:
  """The reference training view: resize, random resized crop, flip, optional jitter.

  Args:
    encoded: encoded image bytes (scalar tf.string) or a uint8 `[H, W, 3]` image.
    seed: `[2]` int64.
    size: output side.
    resize: side of the square pre-resize (0: crop the original, as torchvision's
      RandomResizedCrop alone).
    scale: area range of the crop.
    jitter: None, or (brightness, contrast, saturation, hue) strengths.

  Returns:
    float32 `[size, size, 3]`, normalised.
  """
  image = decode(encoded) if encoded.dtype == tf.string else encoded
  crop_seed, flip_seed, jitter_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  image = _crop_resize(image, crop_seed, size=size, resize=resize, scale=scale)
  image = _maybe(flip_seed, 0.5, tf.image.flip_left_right, image)
  if jitter:
    image = color_jitter(image, jitter_seed, strength=jitter)
  return normalize(image)


def moco_view(encoded: tf.Tensor, seed: tf.Tensor, *, size: int = 224,
              scale: tuple[float, float] = (0.2, 1.0),
              jitter: Sequence[float] = DEFAULT_JITTER, jitter_p: float = 0.8,
              grayscale_p: float = 0.2, blur_p: float = 0.5,
              blur_sigma: tuple[float, float] = (0.1, 2.0)) -> tf.Tensor:
  """A MoCo v2 view (see the module docstring); float32 `[size, size, 3]`."""
  image = decode(encoded) if encoded.dtype == tf.string else encoded
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 8))
  image = _crop_resize(image, seeds[0], size=size, resize=0, scale=scale)
  image = _maybe(seeds[1], jitter_p, lambda x: color_jitter(x, seeds[2], strength=jitter),
                 image)
  image = _maybe(seeds[3], grayscale_p, lambda x: tf.tile(_grayscale(x), [1, 1, 3]),
                 image)
  sigma = tf.random.stateless_uniform([], seeds[4], blur_sigma[0], blur_sigma[1])
  kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # 23 taps at 224, as MoCo v2
  image = _maybe(seeds[5], blur_p, lambda x: gaussian_blur(x, sigma, kernel_size=kernel),
                 image)
  image = _maybe(seeds[6], 0.5, tf.image.flip_left_right, image)
  return normalize(image)


def eval_view(encoded: tf.Tensor, *, size: int = 224, resize: int = 256) -> tf.Tensor:
  """Resize to `resize x resize`, centre crop `size`; float32, normalised."""
  image = decode(encoded) if encoded.dtype == tf.string else encoded
  image = _resize(image, resize, resize)
  offset = (resize - size) // 2
  return normalize(image[offset:offset + size, offset:offset + size])
