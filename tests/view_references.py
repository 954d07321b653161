"""Independent NumPy / PIL references for the tests of `bitune_jax.data.views` (crop,
colour, augment, batch), and the tolerances they are held to: the documented semantics
(torchvision's RandomResizedCrop rule, PIL's bilinear resize of the cropped box), on
fresh random inputs (the `rng` fixture prints its seed on failure).

Tolerances (all absolute):
* Crop-box statistics: 4000 JAX boxes vs a 4000-draw NumPy Monte Carlo; means of h,
  w, top, left and the fallback frequency within 5 standard errors of the difference
  (a false alarm about once in 10^6 per comparison).
* Resizing vs PIL's float mode ("F", per channel, the same triangle filter in float64
  weights): measured up to 2.1e-5 (S = 256, float32 sums over up to 256 pixels),
  so RESIZE_TOL = 1e-4. Vs PIL's usual uint8 "RGB" path (rounded after each pass,
  fixed-point weights): measured max 1.00/255, mean 0.30/255, so RGB_MAX_TOL =
  1.5/255 and RGB_MEAN_TOL = 0.5/255. (PIL's `resize(box=...)` is not the reference:
  its filter reaches pixels outside the box, up to 140/255 apart at the box's edges,
  while torchvision crops first and so only ever sees the box.)
* Normalised outputs vs float64 NumPy: 2e-6 (float32 rounding of values up to ~2.7).
* The same views from different compilations (batch sharded over 8 devices or not,
  one row or 16, vmapped or not): the same boxes and flips, but XLA's float32 sums
  and fusions differ with the shapes: measured up to 1.07e-6 apart (normalised
  units; ~2.4e-7 in [0, 1], a few float32 ulps), so CROSS_TOL = 1e-5. A different
  box or flip is ~1 apart.
* Flip frequency over 2000 keys: within 5 binomial standard errors of 1/2.
* Colour (float32 `adjust_colour`, `grayscale` vs float64 NumPy, hue through
  `colorsys`): measured up to 1.2e-6 (luma 8e-8), so COLOUR_TOL = 1e-5.
* Blur vs SciPy's float64 `convolve1d` (mode "mirror"): measured up to 2.4e-7 (224
  x 224, 23 taps), so BLUR_TOL = 2e-6; SciPy's "reflect" (edge repeated) is > 1e-3
  away.
* MoCo views vs the NumPy composition of their draws, reference views with jitter vs
  the float64 jitter of the plain view, and MoCo views from different compilations
  (8 devices, 1, one row): measured up to 4.5e-6 (normalised units: the jitter's
  factors up to 1.4 and 1 / std amplify float32 rounding), so MOCO_TOL = 3e-5.
* Jitter draws over 20000 keys: means and variances of the factors, and the
  frequency of each op first (1/4), within 5 standard errors. MoCo grayscale (p 0.2),
  blur and flip (p 1/2) frequencies over 2000 keys: within 5 binomial standard errors.
"""

import colorsys
import math

import numpy as np
from PIL import Image
from scipy import ndimage

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
RESIZE_TOL = 1e-4
RGB_MAX_TOL = 1.5 / 255
RGB_MEAN_TOL = 0.5 / 255
NORM_TOL = 2e-6
CROSS_TOL = 1e-5
SIGMAS = 5.0
COLOUR_TOL = 1e-5
BLUR_TOL = 2e-6
MOCO_TOL = 3e-5
RATIO = (3 / 4, 4 / 3)
SIDE, SIZE = 37, 32  # eval_resize(32) = 37
def normalise(x):
  return (np.asarray(x, np.float64) - MEAN) / STD


def unnormalise(x):
  return np.asarray(x, np.float64) * STD + MEAN


def ref_fallback(height, width, ratio=RATIO):
  """torchvision's fallback: the whole image, aspect clamped to `ratio`, centred."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def ref_box(rng, height, width, scale=(0.08, 1.0), ratio=RATIO, attempts=10):
  """One draw of torchvision's RandomResizedCrop.get_params, in NumPy and Python
  floats: `(top, left, h, w, fell_back)`."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w, False
  return (*ref_fallback(height, width, ratio), True)


def check_bounds(boxes, height, width):
  top, left, h, w = boxes.T
  assert (h >= 1).all() and (w >= 1).all()
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()


def assert_means_close(ours, ref, what):
  """Means of two independent samples within SIGMAS standard errors."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  se = math.sqrt(ours.var() / ours.size + ref.var() / ref.size)
  diff = abs(ours.mean() - ref.mean())
  assert diff <= SIGMAS * se + 1e-9, (what, ours.mean(), ref.mean(), se)


def pil_float(crop, size):
  """PIL's bilinear resize of uint8 `crop` in float mode per channel, in [0, 1]."""
  channels = [np.asarray(Image.fromarray(crop[..., c].astype(np.float32), mode="F")
                         .resize((size, size), Image.BILINEAR)) for c in range(3)]
  return np.stack(channels, -1).astype(np.float64) / 255.0


def pil_rgb(crop, size):
  """PIL's usual uint8 RGB bilinear resize of `crop`, in [0, 1]."""
  return np.asarray(Image.fromarray(np.ascontiguousarray(crop))
                    .resize((size, size), Image.BILINEAR)) / 255.0


def np_gray(x):
  """ITU-R 601-2 luma, float64 `[..., 1]`."""
  return (np.asarray(x, np.float64) @ np.array([0.299, 0.587, 0.114]))[..., None]


def np_hue(x, shift):
  """Hue rotated by `shift` turns, per pixel through the standard library's colorsys."""
  out = np.empty(x.shape, np.float64)
  for index in np.ndindex(x.shape[:-1]):
    h, s, v = colorsys.rgb_to_hsv(*(float(c) for c in x[index]))
    out[index] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  return out


def np_adjust(x, factors, order):
  """torchvision's ColorJitter semantics given its draws, in float64: brightness,
  contrast (blend with the mean luma), saturation (blend with the luma image), hue,
  in `order`, each clipped to [0, 1]."""
  x = np.asarray(x, np.float64)
  b, c, s, h = (float(f) for f in factors)
  ops = [lambda x: b * x,
         lambda x: c * x + (1 - c) * np_gray(x).mean(),
         lambda x: s * x + (1 - s) * np_gray(x),
         lambda x: np_hue(x, h)]
  for op in order:
    x = np.clip(ops[int(op)](x), 0.0, 1.0)
  return x


def colour_image(rng, side=12):
  """Random float32 `[side, side, 3]` in [0, 1] with the edge cases of the hue: grey
  pixels, ties of the largest channel, saturated 0 / 1 channels."""
  x = rng.uniform(0, 1, (side, side, 3))
  x[0, :] = rng.uniform(0, 1, (side, 1))  # grey
  x[1, :, 1] = x[1, :, 0]  # r == g
  x[2, :, 2] = x[2, :, 1]  # g == b
  x[3, :, 0] = x[3, :, 2]  # r == b
  x[4] = rng.integers(0, 2, (side, 3))  # black, white and primaries
  return x.astype(np.float32)


def np_blur(x, sigma, kernel_size, mode="mirror"):
  """float64 separable Gaussian blur through SciPy; "mirror" is d c b | a b c d."""
  taps = np.arange(kernel_size) - kernel_size // 2
  kernel = np.exp(-0.5 * (taps / sigma) ** 2)
  kernel /= kernel.sum()
  out = ndimage.convolve1d(np.asarray(x, np.float64), kernel, axis=0, mode=mode)
  return ndimage.convolve1d(out, kernel, axis=1, mode=mode)


def np_map_box(box, hw, side):
  """An original-image box onto the `side x side` cache: both ends times side / height
  (rows) or side / width (columns), rounded half to even; start <= side - 1, end in
  [start + 1, side]."""
  out = []
  for axis in range(2):
    start = min(round(box[axis] * side / hw[axis]), side - 1)
    end = round((box[axis] + box[axis + 2]) * side / hw[axis])
    end = min(max(end, start + 1), side)
    out.append((start, end - start))
  return out[0][0], out[1][0], out[0][1], out[1][1]


def smooth_noisy_image(rng, height, width):
  """uint8 `[H, W, 3]`: a smooth random colour field plus noise."""
  yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
  waves = [np.sin(rng.uniform(1, 9) * xx + rng.uniform(1, 9) * yy + rng.uniform(0, 6))
           for _ in range(3)]
  field = sum(rng.uniform(-60, 60, 3) * wave[..., None] for wave in waves)
  noisy = 128 + field + rng.normal(0, rng.uniform(5, 30), (height, width, 3))
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)
