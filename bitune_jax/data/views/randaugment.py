"""RandAugment on the accelerator, inside `jax.jit`: the 14 ops of FixMatch's Table 12
(Sohn et al. 2020) with PIL's results, and their random draws.

The ops run on uint8 levels (float32 integers 0..255) with PIL's quantisation:
* equal to PIL on every pixel: Identity; AutoContrast (`ImageOps.autocontrast`, cutoff
  0; PIL's float64 table is one level below the exact stretch at 12094 of its 2.8M
  (lo, hi, level) entries, tabulated from PIL's own formula); Equalize, Posterize,
  Solarize (`ImageOps` tables); Brightness, Color, Contrast, Sharpness (`ImageEnhance`,
  `trunc(d + f (x - d))` as PIL's float32 blend: the factor is rounded to a multiple
  of 2^-14, so that every product and sum is exact in float32, FMA or not); ShearX/Y
  (`Image.transform(AFFINE, NEAREST)`'s 16.16 fixed point) and TranslateX/Y (its
  float64 path: a whole shift `floor(t + 0.5)`), reproduced in integers;
* Rotate (`Image.rotate(NEAREST)`): PIL rounds a float64 matrix to 16.16 fixed point,
  ours comes from float32 cos / sin, so a coefficient may be 2^-16 off and a pixel
  whose source point is within (x + y) / 65536 of a pixel edge may take the
  neighbouring source pixel (measured: 23 of 7.0M pixels, 900 random angles).
Geometric ops fill uncovered pixels with grey 128 (`FILL`; PIL's default is black).

A traced `lax.switch` under `vmap` evaluates every branch, so each op is a *program*
of three stages, each an exact identity unless the op uses it: a per-channel table, a
blend with a degenerate image, a fixed-point affine warp. The switch picks the program
(tables, scalars), not an image: a step costs one histogram, one smoothing, two
gathers and a blend whatever the op. Program, table-and-blend and warp are three
iterations of a `fori_loop`, whose carry is stored: fused, XLA's CPU backend computed
the 14-way select of the program again for every pixel (5x slower). 32 strong views
of 112 from a 128 cache: 22 ms on 2 CPU cores, 2 s to trace and compile.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

OPS = ("identity", "auto_contrast", "brightness", "color", "contrast", "equalize",
       "posterize", "rotate", "sharpness", "shear_x", "shear_y", "solarize",
       "translate_x", "translate_y")
# FixMatch Table 12, in the units `apply_op` takes. Solarize: threshold level 256 T,
# T ~ U[0, 1] (levels >= it are inverted); posterize: bits 4 + floor(5 u), 4..8;
# translations: fractions of the width / height (times it in `op_parameter`).
RANGES = {"rotate": (-30.0, 30.0), "solarize": (0.0, 256.0), "color": (0.05, 0.95),
          "contrast": (0.05, 0.95), "brightness": (0.05, 0.95),
          "sharpness": (0.05, 0.95), "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3),
          "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3),
          "posterize": (4.0, 9.0)}
FILL = 128  # geometric ops' fill level
FACTOR_STEP = 2.0 ** -14  # enhance factors are rounded to multiples of this

_ONE, _HALF = 65536, 32768  # 16.16 fixed point
_F32 = jnp.float32


def _planes(image):  # [H, W, C] -> [C, H, W]
  return jnp.transpose(image, (2, 0, 1))


def _image(planes):  # [C, H, W] -> [H, W, C]
  return jnp.transpose(planes, (1, 2, 0))


# ------------------------------------------------------------------ programs
# A program: (lut int32 [3, 256], blend float32 [3] = (factor, degenerate kind,
# constant), warp int32 [6] = 16.16 (a, b, c, d, e, f): the source of output pixel
# (x, y) is ((a x + b y + c) >> 16, (d x + e y + f) >> 16)). Degenerate kinds: 0 the
# constant, 1 the luma, 2 PIL's SMOOTH filter.


def _identity_program():
  lut = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (3, 256))
  warp = jnp.asarray([_ONE, 0, _HALF, 0, _ONE, _HALF], jnp.int32)
  return lut, jnp.asarray([1.0, 0.0, 0.0], _F32), warp


def _fix(v):
  """PIL's `FIX(v) = floor(v * 65536 + 0.5)`, int32, exact whenever `v * 65536` is
  (no rounding at the `+ 0.5`: the fraction is compared instead)."""
  scaled = jnp.asarray(v, _F32) * _ONE
  whole = jnp.floor(scaled)
  return (whole + (scaled - whole >= 0.5)).astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def _autocontrast_exceptions() -> np.ndarray:
  """Sorted int32 keys `lo * 65536 + hi * 256 + level` (lo <= level <= hi) at which
  PIL's table `int(level * scale + offset)` (float64, `scale = 255 / (hi - lo)`,
  `offset = -lo * scale`) is one below the exact `(level - lo) * 255 // (hi - lo)`.
  NumPy float64 performs the same IEEE operations as PIL's Python loop."""
  keys = []
  level = np.arange(256)
  for lo in range(255):
    hi = np.arange(lo + 1, 256)[:, None]
    scale = 255.0 / (hi - lo)
    pil = np.floor(level * scale + (-lo * scale))
    exact = (level - lo) * 255 // (hi - lo)
    rows, cols = np.nonzero((pil < exact) & (level >= lo) & (level <= hi))
    keys.append(lo * 65536 + hi[rows, 0] * 256 + cols)
  return np.sort(np.concatenate(keys)).astype(np.int32)


def _autocontrast_lut(hist):
  """`ImageOps.autocontrast` (cutoff 0) tables of int32 histograms `[3, 256]`."""
  level = jnp.arange(256, dtype=jnp.int32)
  present = hist > 0
  lo = jnp.argmax(present, axis=1)[:, None]
  hi = 255 - jnp.argmax(present[:, ::-1], axis=1)[:, None]
  span = jnp.maximum(hi - lo, 1)
  lut = jnp.clip(jnp.floor_divide((level - lo) * 255, span), 0, 255)
  keys = jnp.asarray(_autocontrast_exceptions())
  query = lo * 65536 + hi * 256 + level
  found = keys[jnp.clip(jnp.searchsorted(keys, query), 0, keys.shape[0] - 1)] == query
  lut = lut - found.astype(jnp.int32)
  return jnp.where(hi > lo, lut, level)


def _equalize_lut(hist):
  """`ImageOps.equalize` tables: `step = (n - count of the last used level) // 255`;
  level i -> `(step // 2 + count below i) // step` (at most 255), or the identity
  where `step` is 0."""
  level = jnp.arange(256, dtype=jnp.int32)
  last = 255 - jnp.argmax(hist[:, ::-1] > 0, axis=1)
  last_count = jnp.take_along_axis(hist, last[:, None], axis=1)
  step = (jnp.sum(hist, axis=1, keepdims=True) - last_count) // 255
  below = jnp.cumsum(hist, axis=1) - hist
  lut = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
  return jnp.where(step > 0, lut, level)


def _program_of(lut=None, blend=None, warp=None):
  """A program with the given stages, the others the identity's."""
  identity = _identity_program()
  lut = identity[0] if lut is None else jnp.broadcast_to(lut, (3, 256))
  blend = identity[1] if blend is None else jnp.stack(blend).astype(_F32)
  warp = identity[2] if warp is None else jnp.stack(warp)
  return lut.astype(jnp.int32), blend, warp.astype(jnp.int32)


def _blend_program(factor, kind, constant=0.0):
  """ImageEnhance: blend with degenerate `kind`; the factor on the 2^-14 grid."""
  factor = jnp.round(jnp.asarray(factor, _F32) / FACTOR_STEP) * FACTOR_STEP
  return _program_of(blend=[factor, _F32(kind), jnp.asarray(constant, _F32)])


def _rotate_program(degrees, height, width):
  """PIL's rotate: the matrix about (w / 2, h / 2) in 16.16 fixed point; its offsets
  `c + (a + b) / 2`, `f + (d + e) / 2` written with `1 - cos = 2 sin^2(angle / 2)`,
  which float32 keeps accurate."""
  angle = -jnp.asarray(degrees, _F32) * (math.pi / 180)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  one_minus_cos = 2 * jnp.square(jnp.sin(angle / 2))
  u, v = 0.5 - width / 2, 0.5 - height / 2
  c, f = 0.5 - one_minus_cos * u + sin * v, 0.5 - one_minus_cos * v - sin * u
  return _program_of(warp=[_fix(x) for x in (cos, sin, c, -sin, cos, f)])


def _shear_program(r, axis):
  """PIL's (1, r, 0, 0, 1, 0) (axis 0) or (1, 0, 0, r, 1, 0): `r * 65536` is exact."""
  fixed, offset = _fix(r), _HALF + _fix(jnp.asarray(r, _F32) / 2)
  if axis == 0:
    return _program_of(warp=[_ONE, fixed, offset, 0, _ONE, _HALF])
  return _program_of(warp=[_ONE, 0, _HALF, fixed, _ONE, offset])


def _translate_program(pixels, axis):
  """PIL's (1, 0, t, 0, 1, 0) (axis 0) or (1, 0, 0, 0, 1, t), which PIL samples in
  float64 at `floor(x + 0.5 + t)`: a whole shift `floor(t + 0.5)`, exact."""
  shift = _fix(jnp.asarray(pixels, _F32) / _ONE) * _ONE + _HALF
  if axis == 0:
    return _program_of(warp=[_ONE, 0, shift, 0, _ONE, _HALF])
  return _program_of(warp=[_ONE, 0, _HALF, 0, _ONE, shift])


def _branches(height, width):
  """Functions (parameter, histograms, mean luma) -> program of each op of `OPS`."""
  level = jnp.arange(256, dtype=jnp.int32)

  def posterize(bits, *_):
    drop = 8 - jnp.clip(jnp.round(bits), 1, 8).astype(jnp.int32)
    return _program_of(lut=jnp.left_shift(jnp.right_shift(level, drop), drop))

  table = {
      "identity": lambda *_: _identity_program(),
      "auto_contrast": lambda _, hist, __: _program_of(lut=_autocontrast_lut(hist)),
      "brightness": lambda f, *_: _blend_program(f, 0),
      "color": lambda f, *_: _blend_program(f, 1),
      "contrast": lambda f, _, mean: _blend_program(f, 0, mean.astype(_F32)),
      "equalize": lambda _, hist, __: _program_of(lut=_equalize_lut(hist)),
      "posterize": posterize,
      "rotate": lambda degrees, *_: _rotate_program(degrees, height, width),
      "sharpness": lambda f, *_: _blend_program(f, 2),
      "shear_x": lambda r, *_: _shear_program(r, 0),
      "shear_y": lambda r, *_: _shear_program(r, 1),
      "solarize": lambda t, *_: _program_of(
          lut=jnp.where(level >= t, 255 - level, level)),
      "translate_x": lambda t, *_: _translate_program(t, 0),
      "translate_y": lambda t, *_: _translate_program(t, 1),
  }
  return [table[name] for name in OPS]


# ----------------------------------------------------------------- applying


def _luma(planes):
  """PIL's "L" of levels `[3, H, W]`: `(19595 R + 38470 G + 7471 B + 32768) >> 16`
  (every partial sum is an integer below 2^24, so float32 holds it exactly)."""
  weighted = 19595 * planes[0] + 38470 * planes[1] + 7471 * planes[2] + 32768.0
  return jnp.floor(weighted * (1.0 / _ONE))


def _smooth(planes):
  """PIL's SMOOTH filter (3 x 3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded
  half up; border pixels kept) of levels `[3, H, W]`. `(n + 6.5) / 13` is never
  within 1/26 of an integer, so float32 rounds it the way PIL does."""
  rows = planes[:, :-2] + planes[:, 1:-1] + planes[:, 2:]
  box = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]
  inner = jnp.floor((box + 4 * planes[:, 1:-1, 1:-1] + 6.5) * (1.0 / 13))
  return planes.at[:, 1:-1, 1:-1].set(inner)


def _flat_levels(planes):
  """int32 `[3 * H * W]`: `256 c + level` of each pixel of levels `[3, H, W]` (flat
  indices scatter and gather faster than (channel, level) pairs on CPU)."""
  offsets = jnp.arange(0, 3 * 256, 256, dtype=jnp.int32)[:, None, None]
  return (planes.astype(jnp.int32) + offsets).reshape(-1)


def _program(planes, op, parameter):
  """The program of op `op` (int, may be traced) with `parameter` for levels
  `[3, H, W]`, from their histograms and mean luma."""
  h, w = planes.shape[1:]
  hist = jnp.zeros(3 * 256, jnp.int32).at[_flat_levels(planes)].add(1).reshape(3, 256)
  luma_sum = jnp.sum(_luma(planes).astype(jnp.int32))
  mean = (2 * luma_sum + h * w) // (2 * h * w)  # int(mean + 0.5), as ImageStat's
  return jax.lax.switch(op, _branches(h, w), jnp.asarray(parameter, _F32), hist, mean)


def _lut_and_blend(planes, program):
  """Levels `[3, H, W]` through a program's table, then its blend (ImageEnhance:
  PIL's Image.blend, `trunc(d + f (x - d))` clipped to 0..255)."""
  lut, blend, _ = program
  x = jnp.take(lut.reshape(-1), _flat_levels(planes)).reshape(planes.shape).astype(_F32)
  factor, kind = blend[0], blend[1]
  degenerate = jnp.where(kind == 1, _luma(planes)[None],
                         jnp.where(kind == 2, _smooth(planes), blend[2]))
  return jnp.clip(jnp.floor(degenerate + factor * (x - degenerate)), 0, 255)


def _warp(planes, warp, fill):
  """Image.transform(AFFINE, NEAREST) of levels `[3, H, W]` by 16.16 fixed-point
  coefficients `warp`; uncovered pixels `fill`."""
  _, h, w = planes.shape
  cols = jnp.arange(w, dtype=jnp.int32)[None, :]
  rows = jnp.arange(h, dtype=jnp.int32)[:, None]
  src_x = jnp.right_shift(warp[0] * cols + warp[1] * rows + warp[2], 16)
  src_y = jnp.right_shift(warp[3] * cols + warp[4] * rows + warp[5], 16)
  inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
  source = jnp.where(inside, src_y * w + src_x, 0).reshape(-1)
  x = jnp.take(planes.reshape(3, h * w), source, axis=1).reshape(3, h, w)
  return jnp.where(inside[None], x, _F32(fill))


def _apply_planes(planes, op, parameter, fill):
  """Op `op` (int, may be traced) with `parameter` on levels `[3, H, W]`: program,
  table and blend, warp, as three iterations of a loop whose carry (image, program)
  is stored: left to fuse, XLA's CPU backend computes the program (the 14 branches'
  select) again for every pixel, and the blend for every warped one (10x slower)."""
  stages = [lambda x, program: (x, _program(x, op, parameter)),
            lambda x, program: (_lut_and_blend(x, program), program),
            lambda x, program: (_warp(x, program[2], fill), program)]
  carry = (planes.astype(_F32), _identity_program())
  return jax.lax.fori_loop(
      0, 3, lambda i, c: jax.lax.switch(i, stages, *c), carry)[0]


# ---------------------------------------------------------------- public ops


def check_image(image: jax.Array, name: str = "image") -> None:
  """ValueError unless `image` is `[H, W, 3]`, 3 to 8192 pixels a side."""
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{name} must be [H, W, 3], got shape {tuple(image.shape)}")
  if not 3 <= min(image.shape[:2]) <= max(image.shape[:2]) <= 8192:
    raise ValueError(f"{name} must be 3 to 8192 pixels a side (16.16 fixed-point "
                     f"warps), got {image.shape[:2]}")


def check_options(num_ops: int = 0, apply_prob: float = 0.0, fill: float = FILL) -> None:
  """ValueError unless the RandAugment options are in range."""
  if not isinstance(num_ops, int) or num_ops < 0:
    raise ValueError(f"num_ops must be an int >= 0, got {num_ops!r}")
  if not 0 <= apply_prob <= 1:
    raise ValueError(f"apply_prob must be in [0, 1], got {apply_prob}")
  if not 0 <= fill <= 255:
    raise ValueError(f"fill must be a level in [0, 255], got {fill}")


def _levels_planes(image):  # [H, W, 3] -> float32 [3, H, W], rounded to 0..255
  return _planes(jnp.clip(jnp.round(image.astype(_F32)), 0, 255))


def apply_op(image: jax.Array, op: str | int | jax.Array, parameter: float | jax.Array,
             *, fill: int = FILL) -> jax.Array:
  """One op of `OPS` on uint8 levels `[H, W, 3]` (uint8, or floats rounded to 0..255).

  `parameter` (may be traced): degrees counter-clockwise (rotate); threshold level
  (solarize: levels >= it inverted); enhance factor (brightness, color, contrast,
  sharpness; on the `FACTOR_STEP` grid, exact for factors in [0, 2]); shear r
  (shear_x: source x + r y; shear_y: source y + r x); pixels t (translate_x / _y:
  source x + t / y + t); bits (posterize, rounded, 1..8); unused by the others. `op`: a
  name or index of `OPS` (may be traced). `fill`: the level of uncovered pixels.
  Returns float32 `[H, W, 3]` of integer levels.
  """
  check_image(image)
  check_options(fill=fill)
  if isinstance(op, str):
    if op not in OPS:
      raise ValueError(f"unknown op {op!r}; the ops are {OPS}")
    op = OPS.index(op)
  elif isinstance(op, (int, np.integer)) and not 0 <= op < len(OPS):
    raise ValueError(f"op must be in [0, {len(OPS)}), got {op}")
  planes = _apply_planes(_levels_planes(image), jnp.asarray(op, jnp.int32), parameter,
                         fill)
  return _image(planes)


def rand_augment_draws(key: jax.Array, *, num_ops: int = 2, apply_prob: float = 0.5
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(ops int32 [num_ops], fractions float32 [num_ops], applied bool [num_ops])`:
  ops uniform over `OPS` with replacement, fractions U[0, 1) (`op_parameter`), each
  op applied with p `apply_prob`. Keys `jax.random.split(key, 3)`, in that order."""
  op_key, fraction_key, apply_key = jax.random.split(key, 3)
  ops = jax.random.randint(op_key, (num_ops,), 0, len(OPS), jnp.int32)
  fractions = jax.random.uniform(fraction_key, (num_ops,), _F32)
  applied = jax.random.bernoulli(apply_key, apply_prob, (num_ops,))
  return ops, fractions, applied


def op_parameter(op: jax.Array, fraction: jax.Array, height: int, width: int
                 ) -> jax.Array:
  """`apply_op`'s parameter for op index `op` at `fraction` of its `RANGES` interval:
  `low + fraction * (high - low)`, floored for posterize, times the width (height)
  for translate_x (translate_y); 0 for the ops without a parameter."""
  bounds = np.asarray([RANGES.get(name, (0.0, 0.0)) for name in OPS], np.float32)
  low, high = jnp.asarray(bounds[:, 0])[op], jnp.asarray(bounds[:, 1])[op]
  value = low + fraction * (high - low)
  value = jnp.where(op == OPS.index("posterize"), jnp.minimum(jnp.floor(value), 8),
                    value)
  return value * jnp.where(op == OPS.index("translate_x"), width,
                           jnp.where(op == OPS.index("translate_y"), height, 1))


def rand_augment_planes(planes: jax.Array, key: jax.Array, num_ops: int,
                        apply_prob: float, fill: float) -> jax.Array:
  """`rand_augment` of levels `[3, H, W]` (channels first)."""
  if num_ops == 0:
    return planes
  ops, fractions, applied = rand_augment_draws(key, num_ops=num_ops,
                                               apply_prob=apply_prob)
  ops = jnp.where(applied, ops, OPS.index("identity"))
  h, w = planes.shape[1:]

  def step(i, x):
    return _apply_planes(x, ops[i], op_parameter(ops[i], fractions[i], h, w), fill)
  return jax.lax.fori_loop(0, num_ops, step, planes)


def rand_augment(image: jax.Array, key: jax.Array, *, num_ops: int = 2,
                 apply_prob: float = 0.5, fill: int = FILL) -> jax.Array:
  """FixMatch's RandAugment with random magnitudes on uint8 levels `[H, W, 3]`:
  `rand_augment_draws(key)`, each op applied in turn as `apply_op(op,
  op_parameter(op, fraction))` where drawn as applied. Float32 `[H, W, 3]` levels."""
  check_image(image)
  check_options(num_ops, apply_prob, fill)
  planes = rand_augment_planes(_levels_planes(image), key, num_ops, apply_prob, fill)
  return _image(planes)
