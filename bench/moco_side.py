"""Benchmark: the side S of the uint8 cache that MoCo v2 views are cut from.

A MoCo view crops 20-100% of the ORIGINAL image's area and resizes it to 224; the
device views (`bitune_jax.data.views.augment.moco_view`) take that box from a cache of
the image resized once to S x S instead. This script measures what that costs in
pixels: synthetic photo-like images of 500 x 375 (a CUB image's size: smooth random
colour fields plus multi-scale texture, or i.i.d. pixel noise with `--texture noise`,
a worst case) are cached at each S as the cache does (PIL bilinear resize of the uint8
image to S x S); for many random MoCo boxes (`moco_box`, area 0.2-1 of the original),
the view from the cache (`crop_and_resize` of the mapped box) is compared with the same
box cropped from the original and resized to 224 by PIL (bilinear, antialiased, float).

  python bench/moco_side.py                          # 64 images, 16 boxes each
  python bench/moco_side.py --texture noise --sides 256,320,384

Per S: the mean and 99th percentile of the absolute error over all pixels and
channels, in /255 units, the mean error in excess of the largest S's (a proxy for the
floor that no cache side removes: the cache's own bilinear interpolation blurs texture
finer than its pixels), and the cache bytes per image (S * S * 3). The last lines name
the smallest S whose excess is under 1/255 (the rule behind `moco_side`) and what
`moco_side(size)` returns.
"""

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bitune_jax.data.views import augment, crop  # noqa: E402

HEIGHT, WIDTH = 375, 500
BIN = 0.01  # histogram bin of the errors, in /255 units


def _upsample(field, height, width):
  """float `[h, w, 3]` -> `[height, width, 3]`, PIL bicubic per channel."""
  return np.stack([np.asarray(Image.fromarray(field[..., c].astype(np.float32), "F")
                              .resize((width, height), Image.BICUBIC))
                   for c in range(3)], -1)


def photos(count: int, *, texture: str, seed: int = 0) -> np.ndarray:
  """uint8 `[count, HEIGHT, WIDTH, 3]`: a smooth colour field (12 x 16 random colours,
  bicubic) plus texture: "octaves" (random fields of 2-32 pixel cells, 8 grey levels of
  std each, a 1/f-like spectrum as in photographs, plus std 2 pixel noise) or "noise"
  (i.i.d. pixel noise of std 12, as `bench/input.py`'s synthetic JPEGs before coding).
  """
  rng = np.random.default_rng(seed)
  out = np.empty((count, HEIGHT, WIDTH, 3), np.uint8)
  for i in range(count):
    image = _upsample(rng.uniform(0, 255, (12, 16, 3)), HEIGHT, WIDTH)
    if texture == "octaves":
      for cell in (2, 4, 8, 16, 32):
        coarse = rng.normal(0, 8, (-(-HEIGHT // cell), -(-WIDTH // cell), 1))
        image += _upsample(np.repeat(coarse, 3, -1), HEIGHT, WIDTH)
      image += rng.normal(0, 2, image.shape)
    else:
      image += rng.normal(0, 12, image.shape)
    out[i] = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return out


def reference(image: np.ndarray, box, size: int) -> np.ndarray:
  """The box (top, left, h, w) of the original, resized by PIL (float), in [0, 1]."""
  top, left, h, w = (int(v) for v in box)
  crop = image[top:top + h, left:left + w].astype(np.float32)
  return _upsample(crop, size, size) / 255.0


@functools.partial(jax.jit, static_argnames=("side", "size"))
def _boxes_and_views(cache, keys, hw, *, side, size):
  """The original and cache boxes of `keys`, and the views from the cache."""
  def one(key):
    original, box = augment.moco_box(key, hw, side)
    return original, crop.crop_and_resize(cache, *box, size=size)
  return jax.vmap(one)(keys)


def measure(images, sides, *, boxes, size, seed=0):
  """`{side: (mean, p99)}` absolute errors in /255 units over all the views."""
  hw = jnp.asarray([HEIGHT, WIDTH], jnp.int32)
  bins = int(256 / BIN)
  counts = {side: np.zeros(bins, np.int64) for side in sides}
  sums = dict.fromkeys(sides, 0.0)
  for i, image in enumerate(images):
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), i), boxes)
    refs = None
    for side in sides:
      cache = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
      originals, views = _boxes_and_views(cache, keys, hw, side=side, size=size)
      if refs is None:  # the original boxes do not depend on the side
        refs = np.stack([reference(image, b, size) for b in np.asarray(originals)])
      error = np.abs(np.asarray(views, np.float64) - refs) * 255
      sums[side] += error.sum()
      counts[side] += np.bincount(np.minimum(error / BIN, bins - 1).astype(np.int64)
                                  .ravel(), minlength=bins)
  results = {}
  for side in sides:
    total = counts[side].sum()
    p99 = (np.searchsorted(np.cumsum(counts[side]), 0.99 * total) + 1) * BIN
    results[side] = (sums[side] / total, p99)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--boxes", type=int, default=16, help="MoCo boxes per image")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--sides", default="224,256,320,384,448,512,640,1024")
  parser.add_argument("--texture", choices=("octaves", "noise"), default="octaves")
  args = parser.parse_args()
  sides = [int(s) for s in args.sides.split(",")]
  start = time.perf_counter()
  images = photos(args.images, texture=args.texture)
  results = measure(images, sides, boxes=args.boxes, size=args.size)
  print(f"{args.images} images of {WIDTH}x{HEIGHT} ({args.texture}), {args.boxes} MoCo "
        f"boxes each (area 0.2-1), views of {args.size}; errors in /255 vs PIL on the "
        f"original ({time.perf_counter() - start:.0f} s)")
  floor = results[max(sides)][0]
  print(f"{'S':>5} {'mean':>7} {'p99':>7} {'excess':>7} {'bytes/image':>12}")
  for side in sides:
    mean, p99 = results[side]
    print(f"{side:>5} {mean:>7.3f} {p99:>7.2f} {mean - floor:>7.3f} "
          f"{side * side * 3:>12,}")
  pick = min(side for side in sides if results[side][0] - floor < 1.0)
  print(f"smallest S with an excess under 1/255: {pick}")
  print(f"moco_side({args.size}) = {augment.moco_side(args.size)}")


if __name__ == "__main__":
  main()
