"""Weak and strong views of one image (FixMatch, Sohn et al. 2020), on the accelerator.

Strong view (FixMatch Sec. 2.3, Table 12): the weak view's flip and shift, then
RandAugment with random magnitudes: `num_ops` = 2 ops drawn uniformly with replacement
from the 14 of Table 12 (`OPS`), each applied with p `apply_prob` = 0.5 (the paper
does not say; FixMatch's released RandAugment pool draws `(op, 0.5, random level)`)
with its parameter uniform in its Table 12 range (`RANGES`); then CutOut: a square of
side `round(L * width)`, L ~ U[0, 0.5] (Table 12), at a uniform centre, clipped at the
borders, set to grey 0.5 (FixMatch's images are in [-1, 1], its CutOut writes 0).
Weak view (FixMatch's weak augmentation): flip with p 0.5, then a shift by up to
12.5% of the side per axis with reflected borders (pad-and-crop); a cache of another
side is first resized to `size` (`crop.crop_and_resize`, antialiased).
"""

import jax
import jax.numpy as jnp

from bitune_jax.data.views.crop import (channels_first, channels_last, crop_and_resize,
                                        normalize)
from bitune_jax.data.views.randaugment import (FILL, check_image, check_options,
                                               rand_augment_planes)

CUTOUT_FILL = 0.5  # in [0, 1]
WEAK_SHIFT = 0.125  # the weak translation, a fraction of the side


def cutout_draws(key: jax.Array, height: int, width: int, *,
                 max_fraction: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(fraction, centre_row, centre_col)`: fraction ~ U[0, max_fraction), the centre
  uniform over the pixels (keys `jax.random.split(key, 3)`). The square has side
  `round(fraction * width)` and top-left corner `centre - side // 2`, clipped to the
  image."""
  fraction_key, row_key, col_key = jax.random.split(key, 3)
  return (jax.random.uniform(fraction_key, (), jnp.float32, 0.0, max_fraction),
          jax.random.randint(row_key, (), 0, height, jnp.int32),
          jax.random.randint(col_key, (), 0, width, jnp.int32))


def _cutout_planes(planes, key, max_fraction, fill):
  h, w = planes.shape[1:]
  fraction, centre_y, centre_x = cutout_draws(key, h, w, max_fraction=max_fraction)
  side = jnp.round(fraction * w).astype(jnp.int32)
  rows = jnp.arange(h)[:, None] - (centre_y - side // 2)
  cols = jnp.arange(w)[None, :] - (centre_x - side // 2)
  square = (rows >= 0) & (rows < side) & (cols >= 0) & (cols < side)
  return jnp.where(square[None], jnp.float32(fill), planes)


def cutout(image: jax.Array, key: jax.Array, *, max_fraction: float = 0.5,
           fill: float = CUTOUT_FILL) -> jax.Array:
  """FixMatch's CutOut of `[H, W, C]` (any units): the square of `cutout_draws(key)`
  set to `fill`; float32."""
  if image.ndim != 3:
    raise ValueError(f"image must be [H, W, C], got shape {tuple(image.shape)}")
  if not 0 <= max_fraction <= 1:
    raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
  planes = channels_first(image.astype(jnp.float32))
  return channels_last(_cutout_planes(planes, key, max_fraction, fill))


# ------------------------------------------------------------------ views


def _weak_planes(image_u8, key, size, shift):
  """FixMatch's weak augmentation, float32 `[3, size, size]` in [0, 1]: resize (if
  needed), flip (p 0.5), translation by whole pixels in [-pad, pad] per axis, `pad =
  round(shift * size)`, reflected borders. Keys `jax.random.split(key)`: flip, shift."""
  check_image(image_u8, "image_u8")
  pad = round(shift * size)
  if size < 1 or not 0 <= pad < size:
    raise ValueError(f"need size >= 1 and 0 <= round(shift * size) < size, got size "
                     f"{size}, shift {shift}")
  flip_key, shift_key = jax.random.split(key)
  mirror = jax.random.bernoulli(flip_key, 0.5)
  height, width = image_u8.shape[:2]
  if (height, width) == (size, size):
    planes = channels_first(image_u8.astype(jnp.float32) / 255)
    planes = jnp.where(mirror, planes[:, :, ::-1], planes)
  else:
    planes = channels_first(crop_and_resize(
        image_u8, 0, 0, height, width, size=size, mirror=mirror))
  offsets = jax.random.randint(shift_key, (2,), -pad, pad + 1)

  def reflect(index):  # into [0, size), the edge not repeated
    index = jnp.abs(index)
    return jnp.where(index > size - 1, 2 * (size - 1) - index, index)
  rows = reflect(jnp.arange(size) + offsets[0])
  cols = reflect(jnp.arange(size) + offsets[1])
  return planes[:, rows][:, :, cols]


def weak_view(image_u8: jax.Array, key: jax.Array, *, size: int,
              shift: float = WEAK_SHIFT) -> jax.Array:
  """FixMatch's weak view of uint8 `[S, S', 3]`: resized to `size x size` (unless it
  is that size), flipped with p 0.5, translated by up to `round(shift * size)` pixels
  per axis with reflected borders; float32 `[size, size, 3]`, normalised."""
  planes = _weak_planes(image_u8, key, size, shift)
  return normalize(channels_last(planes))


def strong_view(image_u8: jax.Array, key: jax.Array, *, size: int, num_ops: int = 2,
                apply_prob: float = 0.5, fill: int = FILL,
                cutout_fraction: float = 0.5, shift: float = WEAK_SHIFT) -> jax.Array:
  """FixMatch's strong view of uint8 `[S, S', 3]`: the weak view's resize, flip and
  translation (its own draws), rounded to levels, `rand_augment`, `cutout` (side up
  to `cutout_fraction` of the width, grey `CUTOUT_FILL`), normalisation. Keys
  `jax.random.split(key, 3)`: weak, RandAugment, CutOut. Float32 `[size, size, 3]`."""
  check_options(num_ops, apply_prob, fill)
  if not 0 <= cutout_fraction <= 1:
    raise ValueError(f"cutout_fraction must be in [0, 1], got {cutout_fraction}")
  weak_key, augment_key, cutout_key = jax.random.split(key, 3)
  levels = jnp.round(_weak_planes(image_u8, weak_key, size, shift) * 255)
  levels = rand_augment_planes(levels, augment_key, num_ops, apply_prob, fill)
  planes = _cutout_planes(levels / 255, cutout_key, cutout_fraction, CUTOUT_FILL)
  return normalize(channels_last(planes))
