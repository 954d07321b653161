"""Offline transfer task on scikit-learn's embedded digits (1797 8x8 grey images).

"source" is digits 0-4 (supervised pre-training), "target" is digits 5-9 relabelled 0-4
(fine-tuning at a low sampling rate). Nothing is downloaded: the data ship with sklearn.

Each digit class is split once into train/test with a fixed seed, so every run, whatever
its `seed` or `sampling_rate`, evaluates on the same test set; `sampling_rate` then keeps
a stratified fraction of the training split only. Images are scaled to [0, 1], resized
bilinearly (pure numpy, same result as `jax.image.resize(..., "bilinear")`), replicated
to 3 channels and normalised with the mean/std of all 1797 digits (`digits_mean_std`).
"""

import functools
from typing import Any

import numpy as np

from bitune_jax.data.splits import _round_half_up, kshot_subset, stratified_subset  # noqa: F401

PARTS = {"source": (0, 1, 2, 3, 4), "target": (5, 6, 7, 8, 9)}
SPLIT_SEED = 0  # Fixed: the train/test split never depends on the run's seed.
_MAX_PIXEL = 16.0  # sklearn digits are integers in [0, 16].


@functools.lru_cache(maxsize=1)
def _raw_digits():
  """Returns (images [1797, 8, 8] float32 in [0, 1], digits [1797] int64), read-only."""
  from sklearn.datasets import load_digits  # Deferred: sklearn is slow to import.
  bunch = load_digits()
  images = (bunch.images / _MAX_PIXEL).astype(np.float32)
  digits = bunch.target.astype(np.int64)
  images.flags.writeable = False
  digits.flags.writeable = False
  return images, digits


def digits_mean_std() -> tuple[float, float]:
  """Mean and std of all 1797 digits scaled to [0, 1] (one value: the images are grey).

  Computed at the native 8x8 resolution, so they do not depend on `image_size` or `part`.

  Returns:
    (mean, std) as Python floats.
  """
  images, _ = _raw_digits()
  flat = images.astype(np.float64)
  return float(flat.mean()), float(flat.std())


def digits_background() -> float:
  """The normalised value of a blank (0) pixel, e.g. a `fill` for translation padding."""
  mean, std = digits_mean_std()
  return -mean / std


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Linear (triangle-kernel) resampling matrix [out_size, in_size], rows summing to 1.

  Half-pixel centres; when downsampling the kernel is widened by the scale (antialias),
  as in `jax.image.resize(..., method="bilinear")`. Taps outside the input are dropped
  and the rest renormalised, which at the borders amounts to edge clamping.

  Args:
    in_size: input length (>= 1).
    out_size: output length (>= 1).

  Returns:
    float64 array [out_size, in_size].
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
  scale = out_size / in_size
  kernel_scale = max(1.0, 1.0 / scale)
  centres = (np.arange(out_size) + 0.5) / scale - 0.5  # Output pixels in input coords.
  dist = np.abs(np.arange(in_size)[None, :] - centres[:, None]) / kernel_scale
  weights = np.maximum(0.0, 1.0 - dist)
  return weights / weights.sum(axis=1, keepdims=True)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinearly resizes grey images [N, h, w] to [N, size, size] (separable, numpy)."""
  rows = resize_matrix(images.shape[1], size).astype(np.float32)
  cols = resize_matrix(images.shape[2], size).astype(np.float32)
  out = np.einsum("oh,nhw->now", rows, images, optimize=True)
  return np.einsum("now,pw->nop", out, cols, optimize=True)


def _split(digits, test_fraction):
  """Stratified (train, test) sorted indices over all digits, fixed by SPLIT_SEED."""
  train, test = [], []
  for digit in range(10):
    members = np.flatnonzero(digits == digit)
    num_test = _round_half_up(test_fraction * len(members))
    num_test = min(max(num_test, 1), len(members) - 1)  # Both sides keep every class.
    order = np.random.default_rng([SPLIT_SEED, digit]).permutation(len(members))
    test.append(members[order[:num_test]])
    train.append(members[order[num_test:]])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _prepare(images, image_size, mean, std):
  """[n, 8, 8] in [0, 1] -> normalised [n, S, S, 3] float32."""
  resized = resize_images(images, image_size)
  normalised = ((resized - np.float32(mean)) / np.float32(std)).astype(np.float32)
  return np.ascontiguousarray(np.repeat(normalised[..., None], 3, axis=-1))


def load_digits_transfer(part: str, *, image_size: int = 32, test_fraction: float = 0.3,
                         sampling_rate: float = 100.0, seed: int = 0) -> dict[str, Any]:
  """One side of the digits transfer task, as numpy arrays.

  Args:
    part: "source" (digits 0-4) or "target" (digits 5-9, relabelled 0-4).
    image_size: output side S (>= 1; 224 works, ~0.6 GB per part in float32).
    test_fraction: fraction of each class held out for test, in (0, 1); the split is
      fixed (seed SPLIT_SEED), independent of `seed` and `sampling_rate`.
    sampling_rate: percentage in (0, 100] of each class of the training split kept
      (`stratified_subset`, at least one image per class).
    seed: non-negative integer choosing the training subset.

  Returns:
    dict with `train_images` [N, S, S, 3] float32, `train_labels` [N] int32,
    `test_images` [M, S, S, 3] float32, `test_labels` [M] int32, `num_classes` (5)
    and `class_names` (the digits as strings, e.g. "5".."9" for "target").

  Raises:
    ValueError: unknown `part`, or an argument out of range.
  """
  if part not in PARTS:
    raise ValueError(f"part must be one of {sorted(PARTS)}, got {part!r}")
  if not 0.0 < sampling_rate <= 100.0:
    raise ValueError(f"sampling_rate is a percentage in (0, 100], got {sampling_rate}")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  if int(image_size) != image_size or image_size < 1:
    raise ValueError(f"image_size must be a positive integer, got {image_size}")
  if int(seed) != seed or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed}")
  images, digits = _raw_digits()
  mean, std = digits_mean_std()
  classes = np.asarray(PARTS[part])
  train_idx, test_idx = _split(digits, test_fraction)
  train_idx = train_idx[np.isin(digits[train_idx], classes)]
  test_idx = test_idx[np.isin(digits[test_idx], classes)]
  train_idx = train_idx[stratified_subset(digits[train_idx], rate=sampling_rate, seed=seed)]
  relabel = lambda idx: (digits[idx] - classes[0]).astype(np.int32)
  return {
      "train_images": _prepare(images[train_idx], int(image_size), mean, std),
      "train_labels": relabel(train_idx),
      "test_images": _prepare(images[test_idx], int(image_size), mean, std),
      "test_labels": relabel(test_idx),
      "num_classes": len(classes),
      "class_names": [str(d) for d in classes],
  }
