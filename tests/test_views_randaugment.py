"""RandAugment (bitune_jax.data.views.randaugment) against PIL and NumPy references,
on fresh random images (the `rng` fixture prints its seed on failure): smooth colour
fields plus noise, uint8, 37 x 52 and 48 x 48.

Tolerances:
* Every op but Rotate vs PIL (`ImageOps`, `ImageEnhance`, `Image.transform(AFFINE,
  NEAREST)`): exact, every pixel (enhance factors rounded to `FACTOR_STEP` for both).
* Rotate vs `Image.rotate(NEAREST)`: exact except where PIL's source point (computed
  here in float64) is within `2 (x + y + 2) / 65536` of a pixel edge, where the
  float32 and float64 fixed-point matrices may pick neighbouring pixels; those are at
  most 1% of the pixels, and at most 1 in 1000 of them differs.
* AutoContrast over (lo, hi) pairs that cover PIL's float64 rounding exceptions: exact.
* Frequencies (ops over 20000 draws, apply decisions): within 5 standard errors (a
  false alarm about once in 10^6 per comparison).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from bitune_jax.data.views import randaugment as ra
from view_references import SIGMAS
from view_references import smooth_noisy_image as _image

SHAPES = [(37, 52), (48, 48)]

_apply = jax.jit(ra.apply_op, static_argnames="fill")
_apply_batch = jax.jit(jax.vmap(ra.apply_op, in_axes=(0, None, None)))


def _factor(f):
  return float(np.round(np.float32(f) / ra.FACTOR_STEP) * ra.FACTOR_STEP)


def _pil(image, name, p, fill=ra.FILL):
  """PIL's op `name` with parameter `p` (the units of `ra.apply_op`), uint8 out."""
  im = Image.fromarray(image)
  colour = (fill,) * 3
  affine = {"shear_x": (1, p, 0, 0, 1, 0), "shear_y": (1, 0, 0, p, 1, 0),
            "translate_x": (1, 0, p, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, p)}
  enhance = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color,
             "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness}
  if name in affine:
    out = im.transform(im.size, Image.AFFINE, affine[name], Image.NEAREST,
                       fillcolor=colour)
  elif name in enhance:
    out = enhance[name](im).enhance(_factor(p))
  else:
    out = {"identity": lambda: im, "auto_contrast": lambda: ImageOps.autocontrast(im),
           "equalize": lambda: ImageOps.equalize(im),
           "posterize": lambda: ImageOps.posterize(im, int(round(p))),
           "solarize": lambda: ImageOps.solarize(im, math.ceil(p)),
           "rotate": lambda: im.rotate(p, Image.NEAREST, fillcolor=colour)}[name]()
  return np.asarray(out)


def _ours(image, name, p, fill=ra.FILL):
  out = np.asarray(_apply(image, ra.OPS.index(name), np.float32(p), fill=fill))
  assert out.dtype == np.float32 and out.shape == image.shape
  np.testing.assert_array_equal(out, np.round(out))
  return out.astype(np.uint8)


def _f32(x):
  return float(np.float32(x))


# ------------------------------------------------------------------- PIL ops


@pytest.mark.parametrize("shape", SHAPES)
def test_table_ops_match_pil_exactly(rng, shape):
  image = _image(rng, *shape)
  cases = [("identity", 0), ("auto_contrast", 0), ("equalize", 0)]
  cases += [("posterize", bits) for bits in (4, 5, 6, 7, 8)]
  cases += [("solarize", t) for t in (0, 1, 128, 255, 256, _f32(rng.uniform(0, 256)))]
  for name, p in cases:
    np.testing.assert_array_equal(_ours(image, name, p), _pil(image, name, p),
                                  err_msg=f"{name} {p}")


def test_autocontrast_reproduces_pils_float64_rounding(rng):
  """Channels covering every level of lo..hi, for (lo, hi) pairs where PIL's float64
  table falls one level below the exact stretch ((0, 25): 25 -> 254) and random ones:
  equal to PIL on every level."""
  pairs = [(0, 25), (0, 29), (0, 50), (3, 200), (0, 255), (7, 8), (254, 255)]
  pairs += [tuple(sorted(rng.choice(256, 2, replace=False))) for _ in range(600)]
  pairs += [(0, int(hi)) for hi in range(1, 256)]
  pairs = np.array(pairs[:len(pairs) // 3 * 3]).reshape(-1, 3, 2)
  images = np.empty((len(pairs), 16, 16, 3), np.uint8)
  for i, triple in enumerate(pairs):
    for c, (lo, hi) in enumerate(triple):
      images[i, ..., c] = np.resize(np.arange(lo, hi + 1), 256).reshape(16, 16)
  ours = np.asarray(_apply_batch(images, ra.OPS.index("auto_contrast"), 0.0))
  ref = np.stack([ImageOps.autocontrast(Image.fromarray(x)) for x in images])
  np.testing.assert_array_equal(ours, ref)
  assert (np.asarray(ra._autocontrast_exceptions()) >= 0).all()


def test_equalize_edge_cases_match_pil(rng):
  """One level (identity), two levels, too few pixels for a step (identity), and a
  histogram whose table exceeds 255 (PIL clips it)."""
  flat = np.full((18, 18, 3), 77, np.uint8)
  two = np.where(rng.random((18, 18, 1)) < 0.5, 10, 240).astype(np.uint8).repeat(3, -1)
  few = rng.integers(0, 255, (18, 18, 3), dtype=np.uint8)
  few[:, :6] = 255  # 216 pixels below the last used level: step 0
  over = np.ones((18, 18, 3), np.uint8)
  over[0, 0], over[0, 1] = 0, 2
  for image in (flat, two, few, over):
    np.testing.assert_array_equal(_ours(image, "equalize", 0),
                                  _pil(image, "equalize", 0))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["brightness", "color", "contrast", "sharpness"])
def test_enhance_ops_match_pil_exactly(rng, shape, name):
  """A random image, and a grey one of levels 100 and 101 in equal numbers (mean luma
  100.5: Contrast's degenerate is 101, PIL rounding half up)."""
  halves = np.full(shape + (3,), 100, np.uint8)
  halves.reshape(-1, 3)[rng.permutation(halves.size // 3)[:halves.size // 6]] = 101
  for image in (_image(rng, *shape), halves):
    for f in (0.05, 0.5, 0.95, 1.0, 1.7, _f32(rng.uniform(0.05, 0.95)),
              _f32(rng.uniform(0.05, 0.95))):
      np.testing.assert_array_equal(_ours(image, name, f), _pil(image, name, f),
                                    err_msg=f"{name} {f}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["shear_x", "shear_y", "translate_x", "translate_y"])
def test_shear_and_translate_match_pil_exactly(rng, shape, name):
  image = _image(rng, *shape)
  size = shape[1] if name == "translate_x" else shape[0]
  if name.startswith("shear"):
    params = [0.3, -0.3, 1e-5, 0.0] + [_f32(rng.uniform(-0.3, 0.3)) for _ in range(4)]
  else:
    params = [0.5, -0.5, 2.0, -7.5, 0.0] + [_f32(rng.uniform(-0.3, 0.3) * size)
                                           for _ in range(4)]
  for p in params:
    for fill in (ra.FILL, 0):
      np.testing.assert_array_equal(_ours(image, name, p, fill),
                                    _pil(image, name, p, fill),
                                    err_msg=f"{name} {p} fill {fill}")


def _rotate_edges(shape, degrees):
  """bool `[H, W]`: PIL's source point of the pixel (float64, before its fixed point)
  within `2 (x + y + 2) / 65536` of a pixel edge."""
  height, width = shape
  angle = -math.radians(degrees)
  a, b = math.cos(angle), math.sin(angle)
  yy, xx = np.mgrid[0:height, 0:width] + 0.5
  sx = a * (xx - width / 2) + b * (yy - height / 2) + width / 2
  sy = -b * (xx - width / 2) + a * (yy - height / 2) + height / 2
  margin = 2 * (xx + yy + 2) / 65536
  return ((np.abs(sx - np.round(sx)) < margin) | (np.abs(sy - np.round(sy)) < margin))


@pytest.mark.parametrize("shape", SHAPES)
def test_rotate_matches_pil_away_from_pixel_edges(rng, shape):
  """Random angles, the range's ends, 0 and 90 degrees (every source point of 90 on
  a pixel edge: exact all the same)."""
  image = _image(rng, *shape)
  edges = differ = pixels = 0
  for degrees in [_f32(rng.uniform(-30, 30)) for _ in range(8)] + [30.0, -30.0, 7.0,
                                                                  0.0, 90.0]:
    ours, ref = _ours(image, "rotate", degrees), _pil(image, "rotate", degrees)
    near = _rotate_edges(shape, degrees) if degrees != 90 else np.ones(shape, bool)
    bad = (ours != ref).any(-1)
    assert not (bad & ~near).any(), (degrees, np.argwhere(bad & ~near)[:5])
    edges += near.sum() if degrees != 90 else 0
    differ, pixels = differ + bad.sum(), pixels + bad.size
  # The exempt points stay few, so the exact comparison covers the image: at most 1.14%
  # of the pixels over 3000 seeds (an angle near atan(p / q) of small p, q puts a
  # lattice of source points on pixel edges: 22.62 = atan(5 / 12) degrees put 148 of
  # 1924 on them, and seed 3030114086 went over the 1% bound this test had).
  assert edges <= 0.02 * pixels and differ <= 1e-3 * pixels, (edges, differ, pixels)
  np.testing.assert_array_equal(_ours(image, "rotate", 90.0),
                                _pil(image, "rotate", 90.0))


def test_fill_and_integer_inputs(rng):
  """Uncovered pixels take `fill`; float inputs are rounded to levels first."""
  image = _image(rng, 37, 52)
  out = _ours(image, "translate_x", 30.0, fill=200)
  assert (out[:, -20:] == 200).all() and (out[:, :20] == image[:, 30:50]).all()
  noisy = image + rng.uniform(-0.4, 0.4, image.shape)
  equalized = _apply(noisy, ra.OPS.index("equalize"), 0.0)
  np.testing.assert_array_equal(np.asarray(equalized), _pil(image, "equalize", 0))


# ------------------------------------------------------------- RandAugment


def test_draws_uniform_ops_and_parameters_in_range(rng):
  """20000 draws: each op 1/14 of the time, applied half of the time (5 standard
  errors), fractions U[0, 1), parameters inside their Table 12 ranges."""
  n = 20000
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), n // 2)
  ops, fractions, applied = jax.vmap(ra.rand_augment_draws)(keys)
  ops, fractions, applied = (np.asarray(x).reshape(-1)
                             for x in (ops, fractions, applied))
  counts = np.bincount(ops, minlength=len(ra.OPS))
  p = 1 / len(ra.OPS)
  assert counts.shape == (14,)
  assert np.abs(counts - n * p).max() <= SIGMAS * math.sqrt(n * p * (1 - p)), counts
  assert abs(applied.mean() - 0.5) <= SIGMAS * math.sqrt(0.25 / n)
  assert 0 <= fractions.min() and fractions.max() < 1
  assert abs(fractions.mean() - 0.5) <= SIGMAS * math.sqrt(1 / 12 / n)
  height, width = 37, 52
  params = np.asarray(jax.vmap(lambda o, f: ra.op_parameter(o, f, height, width))(
      ops, fractions))
  for i, name in enumerate(ra.OPS):
    got = params[ops == i]
    if name not in ra.RANGES:
      assert (got == 0).all()
      continue
    low, high = ra.RANGES[name]
    scale = {"translate_x": width, "translate_y": height}.get(name, 1)
    if name == "posterize":
      assert set(got.tolist()) == {4, 5, 6, 7, 8}, name
    else:
      assert low * scale <= got.min() and got.max() <= high * scale, name
      assert got.max() - got.min() > 0.9 * (high - low) * scale, name


def test_rand_augment_is_apply_op_of_its_draws(rng):
  """Each key's output equals `apply_op` of its drawn ops in turn (the applied ones)."""
  image = _image(rng, 37, 52)
  augment = jax.jit(ra.rand_augment, static_argnames=("num_ops", "apply_prob"))
  for seed in rng.integers(2**31, size=4):
    key = jax.random.key(int(seed))
    ops, fractions, applied = ra.rand_augment_draws(key, num_ops=3, apply_prob=0.7)
    ref = image
    for op, fraction, on in zip(*(np.asarray(x) for x in (ops, fractions, applied))):
      if on:
        p = ra.op_parameter(jnp.int32(op), fraction, 37, 52)
        ref = np.asarray(_apply(ref, int(op), p)).astype(np.uint8)
    out = np.asarray(augment(image, key, num_ops=3, apply_prob=0.7))
    np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(np.asarray(augment(image, key, num_ops=0)), image)


# -------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
  image = np.zeros((32, 32, 3), np.uint8)
  key = jax.random.key(0)
  cases = [
      (lambda: ra.rand_augment(image, key, num_ops=-1), "num_ops"),
      (lambda: ra.rand_augment(image, key, num_ops=1.5), "num_ops"),
      (lambda: ra.rand_augment(image[..., 0], key), r"\[H, W, 3\]"),
      (lambda: ra.rand_augment(np.zeros((32, 32, 4)), key), r"\[H, W, 3\]"),
      (lambda: ra.rand_augment(image, key, apply_prob=1.5), "apply_prob"),
      (lambda: ra.rand_augment(np.zeros((2, 32, 3)), key), "3 to 8192"),
      (lambda: ra.apply_op(image, "blur", 1.0), "unknown op"),
      (lambda: ra.apply_op(image, 14, 1.0), "op must be"),
      (lambda: ra.apply_op(image, "rotate", 1.0, fill=300), "fill"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
