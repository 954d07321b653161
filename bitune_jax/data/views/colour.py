"""Colour and blur on the accelerator, torchvision's semantics in float32.

* `adjust_colour` / `jitter_draws` / `color_jitter`: ColorJitter (brightness, contrast,
  saturation, hue in a random order, each clipped to [0, 1]; the hue rotated through
  HSV); `grayscale`: ITU-R 601-2 luma; `gaussian_blur`: separable, reflected borders,
  sums of shifted slices.
* The `*_planes` forms take channels-first images (`[3, H, W]`), as the views of
  `bitune_jax.data.views.augment` hold them.

Written for XLA's CPU backend as much as for accelerators (where these choices are
neutral or better: fewer flops, no change in layout): the colour passes and the blur's
two passes run as `fori_loop`s, whose carries are stored once (left unrolled, XLA fuses
the chain and computes each earlier pass again for every later one that reads it; an
`optimization_barrier` does not stop it, as the CPU backend removes barriers before
fusion); the hue's remainder is a floor and its three channels one broadcast expression
(a float remainder, or three stacked channels, run 5-8x slower); the blur is a sum of
shifted slices, not a band-matrix product.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from bitune_jax.data.views.crop import channels_first, channels_last

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2
DEFAULT_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue


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
  `adjust_colour_planes`)."""
  return channels_last(adjust_colour_planes(channels_first(image), factors, order,
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


def adjust_colour_planes(planes: jax.Array, factors: jax.Array, order: jax.Array, *,
                         active: bool | jax.Array,
                         grey: bool | jax.Array = False) -> jax.Array:
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


def blur_planes(planes: jax.Array, sigma: float | jax.Array, *, kernel_size: int,
                apply: bool | jax.Array = True) -> jax.Array:
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
  return channels_last(blur_planes(channels_first(image), sigma,
                                     kernel_size=kernel_size, apply=apply))


def blur_kernel_size(size: int) -> int:
  """Taps of the MoCo v2 / SimCLR blur of a `size` view: about a tenth of the side, odd,
  at least 3 (23 at 224, as MoCo v2's blur)."""
  return max(3, int(0.1 * size) // 2 * 2 + 1)

