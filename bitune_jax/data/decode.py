"""Images as the caches hold them: encoded bytes or uint8 arrays decoded to RGB and
resized to `S x S` (the reference transform's `Resize((S, S))`: PIL bilinear with
antialiasing, aspect not kept)."""

import io
from typing import Any

import numpy as np
from PIL import Image


def resize_image(image: np.ndarray, side: int) -> np.ndarray:
  """An image resized to side x side (PIL bilinear, antialiased; aspect not kept).

  Args:
    image: uint8 [H, W, 3], or grey [H, W] / [H, W, 1] (replicated to 3 channels).
    side: the output's height and width, >= 1.

  Returns:
    uint8 [side, side, 3].
  """
  check_side(side)
  return resize(from_array(image, "the image"), side)


def decode(encoded: bytes) -> np.ndarray:
  """Encoded image bytes (any Pillow format) as uint8 [H, W, 3] RGB.

  Grey, RGBA, CMYK and palette images are converted to RGB (PIL `convert("RGB")`).
  Raises ValueError when Pillow cannot decode them.
  """
  return np.asarray(decode_pil(encoded, "the image"))


def resize(img: Image.Image, side: int) -> np.ndarray:
  """uint8 [side, side, 3] from an RGB PIL image."""
  return np.asarray(img.resize((side, side), Image.BILINEAR))


def decode_pil(encoded: bytes, where: str) -> Image.Image:
  """The RGB PIL image of encoded bytes; ValueError naming `where` if undecodable."""
  try:
    img = Image.open(io.BytesIO(encoded))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")
  except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
    raise ValueError(f"{where} cannot be decoded: {type(e).__name__}: {e}") from e


def from_array(item: Any, where: str) -> Image.Image:
  """The RGB PIL image of a uint8 [H, W, 3] / [H, W, 1] / [H, W] array."""
  a = np.asarray(item)
  if a.dtype != np.uint8:
    raise ValueError(f"{where} is a {a.dtype} array; expected uint8")
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)) or 0 in a.shape:
    raise ValueError(f"{where} has shape {tuple(np.shape(item))}; expected [H, W, 3], "
                     "[H, W, 1] or [H, W] with H, W >= 1")
  img = Image.fromarray(np.ascontiguousarray(a))
  return img.convert("RGB") if a.ndim == 2 else img


def to_rgb(item: Any, where: str) -> Image.Image:
  """The RGB PIL image of a source item: encoded bytes or a uint8 array."""
  if isinstance(item, (bytes, bytearray, memoryview)):
    return decode_pil(item, where)
  return from_array(item, where)


def check_side(side: Any) -> None:
  """ValueError unless `side` is an integer >= 1."""
  if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 1:
    raise ValueError(f"side must be an integer >= 1, got {side!r}")
