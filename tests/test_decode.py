"""Decoding and resizing one image (bitune_jax.data.decode): equal to a plain PIL
reference for every kind of item a cache takes; clear errors."""

import numpy as np
import pytest

from bitune_jax.data import decode

import image_samples as samples  # pylint: disable=g-bad-import-order


def test_decode_and_resize_image_equal_reference(rng):
  side = int(rng.integers(4, 40))
  for kind in samples.KINDS:
    item = samples.item(kind, rng)
    images, hw = samples.reference([item], side)
    if isinstance(item, bytes):
      decoded = decode.decode(item)
      assert decoded.dtype == np.uint8 and decoded.shape == (*hw[0], 3), kind
      image = decoded
    else:
      image = item
    np.testing.assert_array_equal(decode.resize_image(image, side), images[0], kind)


def test_errors():
  with pytest.raises(ValueError, match="cannot be decoded"):
    decode.decode(b"not an image")
  with pytest.raises(ValueError, match="side must be"):
    decode.resize_image(np.zeros((3, 3, 3), np.uint8), 0)
