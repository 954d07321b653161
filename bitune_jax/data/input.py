"""What the training loop reads: one `Input` per run, whatever the dataset.

An `Input` holds three splits, a training stream and the views:

* `train`: the target training examples the run uses (its sampling-rate or k-shot
  subset); its evaluation view gives features for retrieval and k-means, and Co-Tuning's
  relationship;
* `test`: the test split;
* `pool`: what the training stream draws from: `train`, plus the replayed source
  examples for unsupervised fine-tuning (`pool_is_replay` marks them, label -1);
* `train_batches(start_step)`: this host's rows of global training batches
  `start_step, start_step + 1, ...` as uint8 cache images (`image_u8`, `hw`, `label`),
  a pure function of the step (a resumed run reads exactly the batches it would have
  read);
* `views(batch, step)`: the JAX function the train step starts with, making the
  training views on the device (`pipeline.make_views`).

Every dataset takes this one path (`bitune_jax.data.pipeline`): the splits are uint8
caches (`bitune_jax.data.cache`) of the embedded digits or of a tfds dataset
(`bitune_jax.data.datasets`).
"""

import collections
import dataclasses
import logging
import os
import queue as queue_lib
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from bitune_jax import sharding
from bitune_jax.data import cache, digits, pipeline, splits

log = logging.getLogger("bitune_jax")


@dataclasses.dataclass
class Input:
  """A run's data; see the module docstring."""
  dataset: str
  num_classes: int
  image_shape: tuple  # (H, W, C) of one view
  metric: str  # the papers' headline metric for this dataset: top1 or mean_class_acc
  train: pipeline.Split
  test: pipeline.Split
  pool: Any  # pipeline.Split or pipeline.Concatenated
  pool_is_replay: np.ndarray  # [len(pool)] bool
  stream: Callable[[int], Any]  # start_step -> iterator of local batches
  view_spec: pipeline.ViewSpec
  val: Any = None  # held out of `train` to choose the best checkpoint (data.val_fraction)
  # FixMatch: every training image of the target, labels hidden (-1); each batch then
  # also holds `fixmatch.mu` times as many of them (`u_image_u8`, `u_hw`, `u_index`).
  unlabelled: Any = None
  # The name of each label, as the dataset gives it (digits 5-9: "5".."9").
  class_names: tuple = ()

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    return self.stream(int(start_step))

  @property
  def views(self) -> Callable[[dict, Any], dict]:
    return pipeline.make_views(self.view_spec)


def load(config: ml_collections.ConfigDict, *, two_views: bool) -> Input:
  """The `Input` of `config.dataset` (`digits`, or a tfds dataset of
  `bitune_jax.data.datasets.SPECS`)."""
  if config.dataset == "digits":
    return _load_digits(config, two_views=two_views)
  from bitune_jax.data import datasets  # pylint: disable=g-import-not-at-top
  return datasets.load(config, two_views=two_views)


def replay_fraction(config: ml_collections.ConfigDict) -> float:
  return config.unsup.replay_fraction if config.method == "unsup_finetune" else 0.0


def cache_side(config: ml_collections.ConfigDict) -> int:
  """S of the run's caches: the reference's pre-resize for `config.image_size` (256 for
  224), or the MoCo view's side (`device_views.moco_side`), or `data.cache_side`."""
  from bitune_jax.data import device_views  # pylint: disable=g-import-not-at-top
  if config.data.get("cache_side", 0):
    return int(config.data.cache_side)
  if config.data.views == "moco":
    return int(device_views.moco_side(config.image_size))
  return pipeline.eval_resize(config.image_size)


def cache_directory(config: ml_collections.ConfigDict) -> str:
  """Where the caches live: `data.cache_dir` ('none': in memory only), else
  `$BITUNE_JAX_CACHE_DIR`, else `DATA_DIR/bitune_jax_cache` for a local data dir, else
  `~/.cache/bitune_jax`."""
  directory = config.data.get("cache_dir", "") or os.environ.get("BITUNE_JAX_CACHE_DIR", "")
  if directory == "none":
    return ""
  if not directory and config.data.data_dir and "://" not in config.data.data_dir:
    directory = os.path.join(config.data.data_dir, "bitune_jax_cache")
  directory = directory or os.path.join(os.path.expanduser("~"), ".cache", "bitune_jax")
  if "://" in directory:
    raise ValueError(f"data.cache_dir {directory} must be a local folder (the caches "
                     "are memory-mapped)")
  os.makedirs(directory, exist_ok=True)
  return directory


def cached_split(config: ml_collections.ConfigDict, key: Mapping[str, Any],
                 source: Sequence[Any], labels: np.ndarray, *,
                 name: str) -> pipeline.Split:
  """`source` (encoded images or uint8 arrays) through the cache, as a `Split`."""
  labels = np.asarray(labels, np.int32)
  c = cache.load(dict(key, count=len(labels)), source, side=cache_side(config),
                 directory=cache_directory(config), name=name,
                 threads=config.data.get("threads", 0) or None)
  return pipeline.Split(c.images, c.hw, labels, config.image_size)


def _load_digits(config, *, two_views):
  """The embedded transfer task (scikit-learn's digits) through the cache."""
  part, shots = config.data.get("part", "target"), config.data.get("kshot", 0)
  # k-shot: k labelled images per class of the whole training split, not of the rate's
  data = digits.transfer_indices(part, sampling_rate=100.0 if shots else
                                 config.sampling_rate, seed=config.seed)
  train_rows, train_labels = data["train_rows"], data["train_labels"]
  if shots:
    keep = splits.kshot_subset(train_labels, shots=shots, seed=config.seed,
                               class_names=data["class_names"])
    train_rows, train_labels = train_rows[keep], train_labels[keep]
  raw = digits.raw_uint8()

  def split(rows, labels, name):
    key = {"dataset": "digits", "rows": cache.rows_key(rows)}
    return cached_split(config, key, raw[rows], labels, name=f"digits-{name}")

  val = None
  if config.data.get("val_fraction", 0.0) > 0:  # held out to choose the best checkpoint
    keep, held = splits.holdout_split(train_labels, fraction=config.data.val_fraction,
                                      seed=config.seed)
    val = split(train_rows[held], train_labels[held], f"{part}-validation")
    train_rows, train_labels = train_rows[keep], train_labels[keep]
  train = split(train_rows, train_labels, f"{part}-train")
  pool = train
  fraction = replay_fraction(config)
  if fraction > 0:  # a fixed random fraction of digits 0-4, unlabelled
    source = digits.transfer_indices("source", seed=config.seed)["train_rows"]
    chosen = source[splits.replay_subset(len(source), fraction=fraction, seed=config.seed)]
    pool = pipeline.Concatenated(train, split(chosen, np.full(len(chosen), -1),
                                              "replay"))
  is_replay = np.arange(len(pool)) >= len(train)
  test = split(data["test_rows"], data["test_labels"], f"{part}-test")
  unlabelled = None
  if config.method == "fixmatch":  # every training image of the target, unlabelled
    every = digits.transfer_indices(part, sampling_rate=100.0, seed=config.seed)
    unlabelled = unlabelled_split(split(every["train_rows"], every["train_labels"],
                                        f"{part}-train-all"))
  return _input(config, "digits", data["num_classes"], "top1", train, test, pool,
                is_replay, val, two_views=two_views, unlabelled=unlabelled,
                class_names=data["class_names"])


def unlabelled_split(split: pipeline.Split) -> pipeline.Split:
  """`split` with its labels hidden (-1): FixMatch's unlabelled data."""
  return dataclasses.replace(split, labels=np.full(len(split), -1, np.int32))


def _input(config, dataset, num_classes, metric, train, test, pool, is_replay, val, *,
           two_views, unlabelled=None, class_names=()):
  """The `Input` of these splits, with the run's stream and views."""
  def stream(start_step):
    labelled = pipeline.train_stream(pool, start_step=start_step,
                                     batch_size=config.batch_size, seed=config.seed)
    if unlabelled is None:
      return labelled
    others = pipeline.train_stream(
        unlabelled, start_step=start_step, stream=1, seed=config.seed,
        batch_size=config.batch_size * config.fixmatch.mu)
    return ({**a, **{f"u_{k}": v for k, v in b.items() if k != "label"}}
            for a, b in zip(labelled, others))

  size = config.image_size
  return Input(dataset=dataset, num_classes=num_classes, image_shape=(size, size, 3),
               metric=metric, train=train, test=test, pool=pool,
               pool_is_replay=is_replay, stream=stream,
               view_spec=pipeline.view_spec(config, two_views=two_views), val=val,
               unlabelled=unlabelled,
               class_names=tuple(str(n) for n in class_names))


def prefetch_to_device(local_batches: Iterable[Mapping[str, np.ndarray]],
                       mesh: jax.sharding.Mesh, *,
                       size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Global arrays of the batches, each built (and copied to the devices) `size` steps
  ahead of the step that needs it; the host batches are gathered by a thread."""
  ready = collections.deque()
  iterator = _in_thread(local_batches, size)

  def enqueue(n):
    for batch in iterator:
      ready.append(sharding.global_batch(batch, mesh))
      if len(ready) >= n:
        return

  try:
    enqueue(size)
    while ready:
      yield ready.popleft()
      enqueue(size)
  finally:
    iterator.close()


def _in_thread(items: Iterable[Any], size: int) -> Iterator[Any]:
  """`items`, produced up to `size` ahead by a daemon thread (its errors re-raised
  here); closing the generator stops the thread."""
  out, stop, done = queue_lib.Queue(maxsize=size), threading.Event(), object()

  def produce():
    try:
      for item in items:
        while not stop.is_set():
          try:
            out.put((item, None), timeout=0.1)
            break
          except queue_lib.Full:
            continue
        if stop.is_set():
          return
      out.put((done, None))
    except BaseException as e:  # pylint: disable=broad-except  (re-raised below)
      out.put((done, e))

  thread = threading.Thread(target=produce, daemon=True, name="bitune-input")
  thread.start()
  try:
    while True:
      item, error = out.get()
      if error is not None:
        raise error
      if item is done:
        return
      yield item
  finally:
    stop.set()
