"""Offline transfer task on scikit-learn's embedded digits (1797 8x8 grey images).

"source" is digits 0-4 (supervised pre-training), "target" is digits 5-9 relabelled 0-4
(fine-tuning at a low sampling rate). Nothing is downloaded: the data ship with sklearn.

Each digit class is split once into train/test with a fixed seed, so every run, whatever
its `seed` or `sampling_rate`, evaluates on the same test set; `sampling_rate` then keeps
a stratified fraction of the training split only. A run reads the digits as any other
dataset: `Source(part)` reads uint8 images (`raw_uint8`, 0..16 scaled to 0..255) for
the cache, as `bitune_jax.data.datasets.Source` reads a tfds dataset;
`load_digits_transfer` gives a side of the task in the evaluation view, as a run
evaluates it.
"""

import functools
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from bitune_jax.data import cache, decode, pipeline
from bitune_jax.data.views.crop import eval_resize
from bitune_jax.data.splits import round_half_up, stratified_subset

PARTS = {"source": (0, 1, 2, 3, 4), "target": (5, 6, 7, 8, 9)}
SPLIT_SEED = 0  # Fixed: the train/test split never depends on the run's seed.
_MAX_PIXEL = 16.0  # sklearn digits are integers in [0, 16].


@functools.lru_cache(maxsize=1)
def _raw_digits():
  """Returns (images [1797, 8, 8] float32 in [0, 1], digits [1797] int64), read-only."""
  # scikit-learn's own file, read without importing scikit-learn (3 s of a start):
  # one row per digit, 64 pixels then the label, as `sklearn.datasets.load_digits`
  # reads it (tests/test_data.py holds the two to each other).
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("the digits demo reads scikit-learn's digits: pip install "
                      "scikit-learn")
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                      "digits.csv.gz")
  rows = np.loadtxt(path, delimiter=",", dtype=np.float32)
  images = (rows[:, :-1].reshape(-1, 8, 8) / _MAX_PIXEL).astype(np.float32)
  digits = rows[:, -1].astype(np.int64)
  images.flags.writeable = False
  digits.flags.writeable = False
  return images, digits


def _split(digits, test_fraction):
  """Stratified (train, test) sorted indices over all digits, fixed by SPLIT_SEED."""
  train, test = [], []
  for digit in range(10):
    members = np.flatnonzero(digits == digit)
    num_test = round_half_up(test_fraction * len(members))
    num_test = min(max(num_test, 1), len(members) - 1)  # Both sides keep every class.
    order = np.random.default_rng([SPLIT_SEED, digit]).permutation(len(members))
    test.append(members[order[:num_test]])
    train.append(members[order[num_test:]])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def eval_images(images_u8: np.ndarray, image_size: int) -> np.ndarray:
  """The evaluation view of uint8 grey digits `[n, h, w]`: each resized to the cache side
  `S` (`eval_resize`, PIL bilinear, as the cache), its centre `image_size` square,
  normalised: float32 `[n, image_size, image_size, 3]`, what a run evaluates."""
  side = eval_resize(image_size)
  resized = np.stack([decode.resize_image(image, side) for image in images_u8])
  return pipeline.eval_view(resized, image_size)


def raw_uint8() -> np.ndarray:
  """All 1797 digits as uint8 grey images `[1797, 8, 8]` (0..16 scaled to 0..255,
  rounded), what the cache resizes (`bitune_jax.data.cache`)."""
  images, _ = _raw_digits()
  return np.round(images * 255.0).astype(np.uint8)


def transfer_indices(part: str, *, test_fraction: float = 0.3,
                     sampling_rate: float = 100.0, seed: int = 0) -> dict[str, Any]:
  """The rows of `raw_uint8()` of one side of the transfer task (see
  `load_digits_transfer` for the arguments): `train_rows`, `train_labels`, `test_rows`,
  `test_labels`, `num_classes` and `class_names`."""
  if part not in PARTS:
    raise ValueError(f"part must be one of {sorted(PARTS)}, got {part!r}")
  if not 0.0 < sampling_rate <= 100.0:
    raise ValueError(f"sampling_rate is a percentage in (0, 100], got {sampling_rate}")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  if int(seed) != seed or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed}")
  _, digits = _raw_digits()
  classes = np.asarray(PARTS[part])
  train_idx, test_idx = _split(digits, test_fraction)
  train_idx = train_idx[np.isin(digits[train_idx], classes)]
  test_idx = test_idx[np.isin(digits[test_idx], classes)]
  train_idx = train_idx[stratified_subset(digits[train_idx], rate=sampling_rate, seed=seed)]
  relabel = lambda idx: (digits[idx] - classes[0]).astype(np.int32)
  return {"train_rows": train_idx, "train_labels": relabel(train_idx),
          "test_rows": test_idx, "test_labels": relabel(test_idx),
          "num_classes": len(classes), "class_names": [str(d) for d in classes]}


def load_digits_transfer(part: str, *, image_size: int = 32, test_fraction: float = 0.3,
                         sampling_rate: float = 100.0, seed: int = 0) -> dict[str, Any]:
  """One side of the digits transfer task, in the evaluation view (`eval_images`).

  Args:
    part: "source" (digits 0-4) or "target" (digits 5-9, relabelled 0-4).
    image_size: side of the view (>= 1).
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
  if int(image_size) != image_size or image_size < 1:
    raise ValueError(f"image_size must be a positive integer, got {image_size}")
  rows = transfer_indices(part, test_fraction=test_fraction,
                          sampling_rate=sampling_rate, seed=seed)
  raw = raw_uint8()
  return {
      "train_images": eval_images(raw[rows["train_rows"]], int(image_size)),
      "train_labels": rows["train_labels"],
      "test_images": eval_images(raw[rows["test_rows"]], int(image_size)),
      "test_labels": rows["test_labels"],
      "num_classes": rows["num_classes"],
      "class_names": rows["class_names"],
  }


class Source:
  """One side of the transfer task, as `bitune_jax.data.input` reads it: splits "train"
  and "test" of `part` (the replay source of the target is `Source("source")`)."""

  def __init__(self, part: str):
    self._rows = transfer_indices(part)
    self.part, self.name, self.metric = part, "digits", "top1"
    self.num_classes = self._rows["num_classes"]
    self.class_names = tuple(self._rows["class_names"])

  def labels(self, split: str) -> np.ndarray:
    return self._rows[f"{split}_labels"]

  def size(self, split: str) -> int:
    return len(self.labels(split))

  def read(self, split: str, keep: np.ndarray | None, *, role: str,
           unlabelled: bool = False) -> tuple[dict[str, Any], Sequence, np.ndarray, str]:
    """`(cache key, uint8 images, labels, cache name)` of the examples `keep` (sorted
    indices, or None: all) of `split`, for `role` ("train", "validation", "test",
    "replay", "train-all"); `unlabelled`: labels -1."""
    rows, labels = self._rows[f"{split}_rows"], self.labels(split)
    if keep is not None:
      rows, labels = rows[keep], labels[keep]
    if unlabelled:
      labels = np.full(len(rows), -1, np.int32)
    name = "digits-replay" if role == "replay" else f"digits-{self.part}-{role}"
    key = {"dataset": "digits", "rows": cache.rows_key(rows)}
    return key, raw_uint8()[rows], labels, name
