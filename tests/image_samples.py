"""Source items of every kind a cache takes (encoded bytes of several Pillow modes,
uint8 arrays) and their plain PIL reference, for test_cache.py and test_decode.py."""

import io

import numpy as np
from PIL import Image


def encode(img, fmt, **kwargs):
  out = io.BytesIO()
  img.save(out, format=fmt, **kwargs)
  return out.getvalue()


def pixels(rng, channels=3):
  h, w = rng.integers(5, 48, size=2)
  shape = (h, w) if channels == 1 else (h, w, channels)
  return rng.integers(0, 256, size=shape, dtype=np.uint8)


def palette(rng, transparent):
  img = Image.fromarray(pixels(rng)).quantize(colors=int(rng.integers(2, 64)))
  return encode(img, "PNG", **({"transparency": 0} if transparent else {}))


def item(kind, rng):
  """A source item of `kind`: encoded bytes of some Pillow mode, or a uint8 array."""
  if kind == "jpeg":
    return encode(Image.fromarray(pixels(rng)), "JPEG", quality=90)
  if kind == "cmyk_jpeg":
    return encode(Image.fromarray(pixels(rng)).convert("CMYK"), "JPEG")
  if kind == "png":
    return encode(Image.fromarray(pixels(rng)), "PNG")
  if kind == "grey_png":
    return encode(Image.fromarray(pixels(rng, 1)), "PNG")
  if kind == "rgba_png":
    return encode(Image.fromarray(pixels(rng, 4)), "PNG")
  if kind in ("palette_png", "palette_alpha_png"):
    return palette(rng, kind == "palette_alpha_png")
  if kind == "grey_array":
    return pixels(rng, 1)
  if kind == "grey1_array":
    return pixels(rng, 1)[..., None]
  if kind == "rgb_array":
    return pixels(rng)
  if kind == "strided_array":
    return pixels(rng)[::-1, ::2]
  raise ValueError(kind)


KINDS = ("jpeg", "cmyk_jpeg", "png", "grey_png", "rgba_png", "palette_png",
         "palette_alpha_png", "grey_array", "grey1_array", "rgb_array", "strided_array")


def source(rng, n=None):
  """n items of random kinds (every kind at least once when n is None)."""
  kinds = list(KINDS) if n is None else list(rng.choice(KINDS, size=n))
  return [item(kind, rng) for kind in kinds]


def reference(source, side):
  """(images [N, S, S, 3], hw [N, 2]): PIL decode, RGB, resize, one item at a time."""
  images, hw = [], []
  for item in source:
    if isinstance(item, bytes):
      with Image.open(io.BytesIO(item)) as img:
        rgb = img.convert("RGB")
    else:
      a = np.asarray(item).reshape(item.shape[0], item.shape[1], -1)
      rgb = Image.fromarray(np.ascontiguousarray(np.broadcast_to(a, (*a.shape[:2], 3))))
    hw.append((rgb.height, rgb.width))
    images.append(np.asarray(rgb.resize((side, side), Image.BILINEAR)))
  return np.stack(images), np.array(hw, np.int32)
