"""`bitune_jax.data.views.colour` (torchvision's ColorJitter, grayscale and blur),
against independent NumPy / PIL references (`view_references` states the tolerances),
on fresh random inputs (the `rng` fixture prints its seed on failure)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax.data.views import colour
from view_references import (BLUR_TOL, COLOUR_TOL, SIGMAS, colour_image, np_adjust,
                             np_blur, np_gray)


_adjust = jax.jit(jax.vmap(colour.adjust_colour))


def test_grayscale_is_itu_601_luma(rng):
  x = rng.uniform(0, 1, (9, 11, 3)).astype(np.float32)
  out = jax.jit(colour.grayscale)(x)
  assert out.shape == (9, 11, 1) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np_gray(x), atol=COLOUR_TOL, rtol=0)


@pytest.mark.parametrize("op", [0, 1, 2, 3])
def test_adjust_colour_each_op_alone(rng, op):
  """One op with a random factor (the others at their identity: 1, 1, 1, 0), in a
  random position of the order, == the float64 reference of that op alone; factors
  beyond the jitter ranges too (clipping, negative saturation, hue past a half turn)."""
  n = 6
  images = np.stack([colour_image(rng) for _ in range(n)])
  factors = np.tile(np.array([1.0, 1.0, 1.0, 0.0], np.float32), (n, 1))
  factors[:, op] = (rng.uniform(-0.6, 0.6, n) if op == 3 else rng.uniform(0, 2.5, n))
  factors[0, op] = 0.0 if op < 3 else 0.5  # black / mean / grey / the opposite hue
  orders = np.stack([rng.permutation(4) for _ in range(n)]).astype(np.int32)
  out = np.asarray(_adjust(images, factors, orders))
  assert out.dtype == np.float32 and out.shape == images.shape
  for i in range(n):
    expected = np_adjust(images[i], factors[i], [op])
    np.testing.assert_allclose(out[i], expected, atol=COLOUR_TOL, rtol=0,
                               err_msg=f"op {op}, factor {factors[i, op]}")


def test_adjust_colour_random_order(rng):
  """Random factors in the default jitter ranges, in random orders (every order's
  result differs: the ops do not commute)."""
  n = 8
  images = np.stack([colour_image(rng) for _ in range(n)])
  factors = np.stack([rng.uniform(0.6, 1.4, n), rng.uniform(0.6, 1.4, n),
                      rng.uniform(0.6, 1.4, n), rng.uniform(-0.1, 0.1, n)], 1)
  factors = factors.astype(np.float32)
  orders = np.stack([rng.permutation(4) for _ in range(n)]).astype(np.int32)
  out = np.asarray(_adjust(images, factors, orders))
  for i in range(n):
    np.testing.assert_allclose(out[i], np_adjust(images[i], factors[i], orders[i]),
                               atol=COLOUR_TOL, rtol=0, err_msg=str(orders[i]))
  reversed_order = np.asarray(_adjust(images, factors, orders[:, ::-1].copy()))
  assert np.abs(reversed_order - out).max() > 100 * COLOUR_TOL


@pytest.mark.parametrize("strength", [(0.4, 0.4, 0.4, 0.1), (1.5, 0.0, 0.25, 0.5)])
def test_jitter_draws_distribution(rng, strength):
  """20000 draws: factors ~ U[max(0, 1 - v), 1 + v] (hue U[-v, v]): inside the range,
  reaching both ends, means and variances within 5 standard errors; orders are
  permutations, each op first a quarter of the time (within 5 standard errors)."""
  n = 20000
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), n)
  factors, orders = jax.jit(jax.vmap(lambda k: colour.jitter_draws(k, strength)))(keys)
  factors, orders = np.asarray(factors, np.float64), np.asarray(orders)
  assert factors.shape == (n, 4) and orders.shape == (n, 4)
  bounds = [(max(0.0, 1 - v), 1 + v) for v in strength[:3]] + [
      (-strength[3], strength[3])]
  for i, (low, high) in enumerate(bounds):
    f = factors[:, i]
    assert f.min() >= low - 1e-6 and f.max() <= high + 1e-6, (i, f.min(), f.max())
    width = high - low
    if width == 0:
      np.testing.assert_allclose(f, low, atol=1e-6)
      continue
    assert f.min() < low + 0.01 * width and f.max() > high - 0.01 * width
    se_mean = width / math.sqrt(12 * n)
    assert abs(f.mean() - (low + high) / 2) <= SIGMAS * se_mean, (i, f.mean())
    # U's variance is width^2 / 12; its sample's standard error: sqrt(4/5 / n) of it.
    var = width**2 / 12
    assert abs(f.var() - var) <= SIGMAS * var * math.sqrt(0.8 / n), (i, f.var(), var)
  np.testing.assert_array_equal(np.sort(orders, 1), np.broadcast_to(np.arange(4),
                                                                     orders.shape))
  first = np.bincount(orders[:, 0], minlength=4) / n
  assert np.all(np.abs(first - 0.25) <= SIGMAS * math.sqrt(0.25 * 0.75 / n)), first
  assert len({tuple(o) for o in orders}) == 24


def test_color_jitter_is_adjust_colour_of_its_draws(rng):
  image = colour_image(rng)
  key = jax.random.key(int(rng.integers(2**31)))
  factors, order = colour.jitter_draws(key, (0.4, 0.3, 0.2, 0.1))
  out = colour.color_jitter(image, key, strength=(0.4, 0.3, 0.2, 0.1))
  np.testing.assert_allclose(np.asarray(out), np_adjust(image, factors, order),
                             atol=COLOUR_TOL, rtol=0)


@pytest.mark.parametrize("shape,kernel_size", [
    ((224, 224, 3), 23), ((32, 32, 3), 3), ((9, 14, 3), 23), ((1, 5, 2), 7)])
def test_gaussian_blur_matches_scipy_mirror(rng, shape, kernel_size):
  """Random sigma in [0.1, 2] (and a wide one, 6): == SciPy's "mirror" borders (the
  edge pixel not repeated), also for images smaller than the kernel (reflected again
  and again); SciPy's "reflect" (the edge repeated) is measurably different."""
  image = rng.uniform(0, 1, shape).astype(np.float32)
  blur = jax.jit(colour.gaussian_blur, static_argnames="kernel_size")
  for sigma in (*rng.uniform(0.1, 2.0, 2), 6.0):
    out = blur(image, np.float32(sigma), kernel_size=kernel_size)
    assert out.shape == shape and out.dtype == jnp.float32
    expected = np_blur(image, np.float32(sigma), kernel_size)
    np.testing.assert_allclose(np.asarray(out), expected, atol=BLUR_TOL, rtol=0,
                               err_msg=f"sigma {sigma}")
    if sigma > 1 and min(shape[:2]) > 1:
      repeated = np_blur(image, np.float32(sigma), kernel_size, mode="reflect")
      assert np.abs(repeated - expected).max() > 1e-3


def test_blur_kernel_size_is_a_tenth_odd_at_least_three():
  for size, taps in [(224, 23), (32, 3), (20, 3), (64, 7), (96, 9), (160, 17),
                     (384, 39)]:
    assert colour.blur_kernel_size(size) == taps, size
