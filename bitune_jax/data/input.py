"""What the training loop reads: one `Input` per run, whatever the dataset.

An `Input` holds three splits and a training stream:

* `train`: the target training examples the run uses (its sampling-rate or k-shot
  subset), in the evaluation view: features for retrieval and k-means, Co-Tuning's
  relationship;
* `test`: the test split, evaluation view;
* `pool`: what the training stream draws from: `train`, plus the replayed source
  examples for unsupervised fine-tuning (`pool_is_replay` marks them, label -1);
* `train_batches(start_step)`: this host's rows of global training batches
  `start_step, start_step + 1, ...`, a pure function of the step (a resumed run reads
  exactly the batches it would have read).

`Split.batches(batch_size)` yields this host's rows of padded global evaluation batches
(`image`, `label`, `mask`), the same number on every host. The embedded digits live in
numpy (`ArraySplit`); the tfds datasets hold their encoded images in memory and decode
and augment in tf.data (`bitune_jax.data.pipeline`).
"""

import collections
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from bitune_jax import sharding
from bitune_jax.data import batches, digits, splits


@dataclasses.dataclass
class ArraySplit:
  """A split held as numpy arrays on every host (the embedded digits)."""
  images: np.ndarray  # [N, H, W, C] float32
  labels: np.ndarray  # [N] int32

  @property
  def num_examples(self) -> int:
    return len(self.labels)

  def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    start, stop = sharding.local_slice(batch_size)
    for batch in batches.eval_batches(self.images, self.labels, batch_size=batch_size):
      yield {k: v[start:stop] for k, v in batch.items()}


@dataclasses.dataclass
class Input:
  """A run's data; see the module docstring."""
  dataset: str
  num_classes: int
  image_shape: tuple  # (H, W, C) of one view
  metric: str  # the papers' headline metric for this dataset: top1 or mean_class_acc
  train: Any
  test: Any
  pool: Any
  pool_is_replay: np.ndarray  # [len(pool)] bool (this host's pool)
  stream: Callable[[int], Any]  # start_step -> iterator of local batches
  val: Any = None  # held out of `train` to choose the best checkpoint (data.val_fraction)

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    return self.stream(int(start_step))


def load(config: ml_collections.ConfigDict, *, two_views: bool) -> Input:
  """The `Input` of `config.dataset` (`digits`, or a tfds dataset of
  `bitune_jax.data.datasets.SPECS`)."""
  if config.dataset == "digits":
    return _load_digits(config, two_views=two_views)
  from bitune_jax.data import datasets  # pylint: disable=g-import-not-at-top
  return datasets.load(config, two_views=two_views)


def replay_fraction(config: ml_collections.ConfigDict) -> float:
  return config.unsup.replay_fraction if config.method == "unsup_finetune" else 0.0


def _load_digits(config, *, two_views):
  """The embedded transfer task (scikit-learn's digits), in numpy."""
  data = digits.load_digits_transfer(
      config.data.get("part", "target"), image_size=config.image_size,
      sampling_rate=config.sampling_rate, seed=config.seed)
  train_images, train_labels = data["train_images"], data["train_labels"]
  if config.data.get("kshot", 0):  # k labelled images per class
    keep = splits.kshot_subset(train_labels, shots=config.data.kshot, seed=config.seed)
    train_images, train_labels = train_images[keep], train_labels[keep]
  val = None
  if config.data.get("val_fraction", 0.0) > 0:  # held out to choose the best checkpoint
    keep, held = splits.holdout_split(train_labels, fraction=config.data.val_fraction,
                                      seed=config.seed)
    val = ArraySplit(train_images[held], train_labels[held])
    train_images, train_labels = train_images[keep], train_labels[keep]
  pool_images, pool_labels = train_images, train_labels
  fraction = replay_fraction(config)
  if fraction > 0:  # a fixed random fraction of digits 0-4, unlabelled
    source = digits.load_digits_transfer("source", image_size=config.image_size,
                                         seed=config.seed)["train_images"]
    chosen = splits.replay_subset(len(source), fraction=fraction, seed=config.seed)
    pool_images = np.concatenate([train_images, source[chosen]])
    pool_labels = np.concatenate([train_labels, np.full(len(chosen), -1, np.int32)])
  is_replay = np.arange(len(pool_labels)) >= len(train_labels)
  fill = digits.digits_background()

  def stream(start_step):
    begin, end = sharding.local_slice(config.batch_size)
    for step in _count(start_step):
      batch = batches.train_batch(pool_images, pool_labels, step=step,
                                  batch_size=config.batch_size, seed=config.seed,
                                  two_views=two_views, fill=fill)
      yield {k: v[begin:end] for k, v in batch.items()}

  return Input(dataset="digits", num_classes=data["num_classes"],
               image_shape=train_images.shape[1:], metric="top1",
               train=ArraySplit(train_images, train_labels),
               test=ArraySplit(data["test_images"], data["test_labels"]),
               pool=ArraySplit(pool_images, pool_labels), pool_is_replay=is_replay,
               stream=stream, val=val)


def _count(start):
  while True:
    yield start
    start += 1


def prefetch_to_device(local_batches: Iterable[Mapping[str, np.ndarray]],
                       mesh: jax.sharding.Mesh, *,
                       size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Global arrays of the next `size` batches are built (and copied) ahead of the step
  that needs them."""
  queue = collections.deque()
  iterator = iter(local_batches)

  def enqueue(n):
    for batch in iterator:
      queue.append(sharding.global_batch(batch, mesh))
      if len(queue) >= n:
        return

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(size)
