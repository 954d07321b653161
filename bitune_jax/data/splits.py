"""Which examples a run uses: sampling-rate and k-shot subsets, held-out splits, each
host's share, the replayed fraction of a source dataset. Pure numpy, deterministic by
seed, independent of the host count unless said otherwise."""

import math
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike


def round_half_up(x: float) -> int:
  """Rounds a non-negative float half up (2.5 -> 3), tolerant to float noise (0.3 * 175)."""
  return int(math.floor(x + 0.5 + 1e-9))


def stratified_subset(labels: ArrayLike, *, rate: float, seed: int) -> np.ndarray:
  """Indices of a per-class random subset keeping `rate` percent of every class.

  Class c keeps max(1, round_half_up(rate / 100 * n_c)) of its n_c examples: every class
  stays present. The subset is the first k of a per-class permutation drawn from
  `np.random.default_rng([seed, i])` (i: rank of the class among the sorted classes),
  so for a fixed seed a lower rate gives a subset of a higher rate's subset.

  Args:
    labels: [N] integer class labels.
    rate: percentage in (0, 100].
    seed: non-negative integer.

  Returns:
    Sorted int64 indices into `labels`.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if not 0.0 < rate <= 100.0:
    raise ValueError(f"rate is a percentage in (0, 100], got {rate}")
  if int(seed) != seed or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed}")
  keep = []
  for rank, cls in enumerate(np.unique(labels)):
    members = np.flatnonzero(labels == cls)
    count = max(1, round_half_up(rate * len(members) / 100.0))
    order = np.random.default_rng([int(seed), rank]).permutation(len(members))
    keep.append(members[order[:count]])
  if not keep:
    return np.zeros((0,), np.int64)
  return np.sort(np.concatenate(keep)).astype(np.int64)


def kshot_subset(labels: np.ndarray, *, shots: int, seed: int,
                 class_names: Sequence[str] | None = None) -> np.ndarray:
  """Sorted indices of `shots` examples of every class, by seed: k-shot draws from the
  whole training split (no sampling rate). A class with fewer than `shots` examples is
  an error naming it (`class_names[c]`, else its label) and its count."""
  if shots < 1:
    raise ValueError(f"shots must be >= 1, got {shots}")
  labels = np.asarray(labels)
  classes, counts = np.unique(labels, return_counts=True)
  for c, n in zip(classes, counts):
    if n < shots:
      name = class_names[c] if class_names is not None else c
      raise ValueError(f"data.kshot={shots} but class {name} has only {n} training "
                       f"images; give data.kshot <= {int(counts.min())}")
  rng = np.random.default_rng([seed, shots])
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in classes]
  return np.sort(np.concatenate(chosen))


def holdout_split(labels: np.ndarray, *, fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`(train_idx, val_idx)`: a stratified held-out split; each class keeps >= 1 in train."""
  rng = np.random.default_rng(seed)
  train, val = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_val = min(int(fraction * len(idx)), len(idx) - 1)
    val.extend(idx[:n_val])
    train.extend(idx[n_val:])
  return np.sort(train), np.sort(val)


def train_subset(labels: np.ndarray, *, rate: float, shots: int, seed: int,
                 num_classes: int,
                 class_names: Sequence[str] | None = None) -> np.ndarray | None:
  """Sorted indices of a run's training examples, or None for all of them: k-shot (k
  per class of the whole split, the rate ignored), or a sampling rate. Every one of
  the `num_classes` classes must have examples."""
  present = np.unique(labels)
  if len(present) != num_classes:
    raise ValueError(f"the training split has {len(present)} classes with examples, "
                     f"expected {num_classes}")
  if shots:
    return kshot_subset(labels, shots=shots, seed=seed, class_names=class_names)
  if rate < 100:
    return stratified_subset(labels, rate=rate, seed=seed)
  return None


def replay_subset(n: int, *, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of a fixed random `fraction` of `n` source examples (at least one):
  the sparse source replay of unsupervised fine-tuning."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"replay fraction must be in (0, 1], got {fraction}")
  count = max(1, round(fraction * n))
  return np.sort(np.random.default_rng([int(seed), 1]).choice(n, count, replace=False))
