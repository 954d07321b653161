"""One input path for every dataset: uint8 cache images on the host, views on the device.

Every split a run reads (the digits, a tfds dataset, a custom builder's, replayed source
images, a k-shot or sampling-rate subset) is decoded and resized once into a uint8
cache `[N, S, S, 3]` (`bitune_jax.data.cache`), held on every host (memory-mapped).
The host's only work per step is to gather its rows of the global batch from it:

* training: global batch `step` is positions `[step * B, (step + 1) * B)` of one endless
  stream of per-epoch permutations (`stream_indices`, seeded by the run's seed); each
  host takes rows `[i * B / hosts, (i + 1) * B / hosts)` and ships them as uint8
  (`image_u8`, with each image's original `hw`). The views are made inside the jitted
  train step (`bitune_jax.data.views.batch.make_views`), each example's from keys
  folded from (seed, step, its row in the global batch, view): the pixels do not depend
  on the number of devices or hosts, and a resumed run makes the same views.
* evaluation: the global padded batches of the split in order, each host taking its
  rows, in the evaluation view (the centre `size x size` of the cache image, cut and
  normalised here: no resampling, so it is cheap on the host).
"""

import dataclasses
import functools
from collections.abc import Iterator

import jax
import numpy as np

from bitune_jax.data.views.crop import MEAN_RGB, STD_RGB


# --------------------------------------------------------------------------- order
@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed, epoch, n):
  """Read-only permutation of range(n) for one epoch (cached: consecutive steps share it)."""
  entropy = list(seed) if isinstance(seed, tuple) else [seed]
  perm = np.random.default_rng(entropy + [epoch]).permutation(n)
  perm.flags.writeable = False
  return perm


def stream_indices(n: int, *, step: int, batch_size: int,
                   seed: int | tuple[int, ...]) -> np.ndarray:
  """Example indices of batch `step`: positions [step*B, (step+1)*B) of the stream, an
  endless concatenation of per-epoch permutations (epoch e:
  `np.random.default_rng([*seed, e]).permutation(n)`).

  Args:
    n: number of examples (>= 1).
    step: non-negative batch number.
    batch_size: B (>= 1; may exceed n, the batch then spans several epochs).
    seed: non-negative integer, or a tuple of them.

  Returns:
    int64 indices [B] into the examples.
  """
  positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
  epochs, offsets = np.divmod(positions, n)
  out = np.empty_like(positions)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = _epoch_permutation(seed, int(epoch), n)[offsets[sel]]
  return out


def local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f"batch size {batch_size} does not split over {process_count} hosts")
  return batch_size // process_count


def _host(process_count, process_index):
  return (jax.process_count() if process_count is None else process_count,
          jax.process_index() if process_index is None else process_index)


# --------------------------------------------------------------------------- splits
@dataclasses.dataclass
class Split:
  """A split's cache images and labels (the whole split, on every host)."""
  images: np.ndarray  # [N, S, S, 3] uint8 (a read-only memory map, or in memory)
  hw: np.ndarray  # [N, 2] int32: each image's original (height, width)
  labels: np.ndarray  # [N] int32 (-1: unlabelled)
  size: int  # side of the views (the evaluation view is the centre size x size)

  def __post_init__(self):
    if not len(self.images) == len(self.hw) == len(self.labels):
      raise ValueError(f"{len(self.images)} images, {len(self.hw)} sizes and "
                       f"{len(self.labels)} labels")
    if self.images.shape[1] < self.size or self.images.shape[2] < self.size:
      raise ValueError(f"cache images of {self.images.shape[1:3]} are smaller than the "
                       f"view side {self.size}")

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """`image_u8` [n, S, S, 3], `hw` [n, 2] and `label` [n] of `rows` (a copy)."""
    rows = np.asarray(rows)
    return {"image_u8": np.asarray(self.images[rows]), "hw": self.hw[rows],
            "label": self.labels[rows]}

  def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of padded global evaluation batches (see `eval_batches`)."""
    return eval_batches(self, batch_size=batch_size)


@dataclasses.dataclass
class Concatenated:
  """`first` then `second` (a target split and replayed source images), not copied."""
  first: Split
  second: Split

  def __len__(self) -> int:
    return len(self.first) + len(self.second)

  @property
  def labels(self) -> np.ndarray:
    return np.concatenate([self.first.labels, self.second.labels])

  def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    rows = np.asarray(rows)
    split = rows >= len(self.first)
    one, two = self.first.take(rows[~split]), self.second.take(rows[split] - len(self.first))
    out = {}
    for key in one:
      value = np.empty((len(rows),) + one[key].shape[1:], one[key].dtype)
      value[~split], value[split] = one[key], two[key]
      out[key] = value
    return out


def eval_view(images_u8: np.ndarray, size: int) -> np.ndarray:
  """The centre `size x size` of uint8 `[n, S, S, 3]` (top = left = (S - size) // 2),
  float32, normalised with the ImageNet mean and std."""
  top = (images_u8.shape[1] - size) // 2
  left = (images_u8.shape[2] - size) // 2
  crop = images_u8[:, top:top + size, left:left + size].astype(np.float32) / 255.0
  return ((crop - np.asarray(MEAN_RGB, np.float32)) /
          np.asarray(STD_RGB, np.float32)).astype(np.float32)


def eval_batches(split: Split, *, batch_size: int, process_count: int | None = None,
                 process_index: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This host's rows of the evaluation view of every example, in order, padded to
  whole global batches.

  The global batches are `ceil(n / batch_size)` batches of `batch_size` rows; each host
  yields rows `[i * local, (i + 1) * local)` of each (`local = batch_size / hosts`):
  `image` [local, size, size, 3] float32, `label` [local] int32, `mask` [local] float32
  (0 for padding).
  """
  count, index = _host(process_count, process_index)
  local = local_batch_size(batch_size, count)
  if len(split) == 0:
    raise ValueError("the split holds no example")
  return _eval_batches(split, batch_size, local, index)


def _eval_batches(split, batch_size, local, index):
  for start in range(0, len(split), batch_size):
    rows = np.arange(start + index * local, start + (index + 1) * local)
    real = rows < len(split)
    rows = np.where(real, rows, 0)  # padding: the first example, masked out
    batch = split.take(rows)
    yield {"image": eval_view(batch["image_u8"], split.size),
           "label": np.where(real, batch["label"], 0).astype(np.int32),
           "mask": real.astype(np.float32)}


# --------------------------------------------------------------------------- training
def train_stream(pool: Split | Concatenated, *, start_step: int, batch_size: int,
                 seed: int, process_count: int | None = None,
                 process_index: int | None = None,
                 stream: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This host's rows of training batches `start_step, start_step + 1, ...`.

  Args:
    pool: what the run trains on (`Split`, or `Concatenated` with replayed images).
    start_step: the first batch's step.
    batch_size: the global batch size (each host yields batch_size / hosts rows).
    seed: the run's seed (the order; the views are seeded in the step).
    process_count, process_index: the host layout (default: JAX's).
    stream: another number gives another order of the same pool (FixMatch's
      unlabelled stream beside its labelled one).

  Returns:
    An iterator of numpy dicts: `image_u8` [b, S, S, 3] uint8, `hw` [b, 2] int32,
    `label` [b] int32 (-1 for replayed images) and `index` [b] int32, each example's
    row of `pool`.
  """
  count, index = _host(process_count, process_index)
  local = local_batch_size(batch_size, count)
  if len(pool) == 0:
    raise ValueError("no training examples")
  return _train_stream(pool, int(start_step), batch_size, (int(seed), int(stream)),
                       local, index)


def _train_stream(pool, step, batch_size, seed, local, index):
  rows = slice(index * local, (index + 1) * local)  # this host's rows
  while True:
    idx = stream_indices(len(pool), step=step, batch_size=batch_size, seed=seed)
    batch = pool.take(idx[rows])
    batch["index"] = idx[rows].astype(np.int32)  # the pool rows (a memory bank's slots)
    yield batch
    step += 1
