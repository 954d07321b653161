"""What the training loop reads: one `Input` per run, whatever the dataset.

`load(config, needs)` makes the run's `DataSpec` (`bitune_jax.data.spec`) and
`assemble(spec)` reads it. A source (`digits.Source`, `datasets.Source`: the digits, a
tfds dataset or one of `bitune_jax.data.builders`) says only how to read its "train"
and "test" splits; which examples a run takes is decided here, once for every source:

* `train`: the sampling-rate or k-shot subset of the training split (`splits`), less
  `val`, the share held out to choose the best checkpoint (`data.val_fraction`); its
  evaluation view gives features for retrieval and k-means, and Co-Tuning's
  relationship;
* `test`: the test split;
* `pool`: what the training stream draws from: `train`, plus a fixed random fraction
  (`Needs.replay_fraction`) of the replay source's training split, unlabelled
  (`pool_is_replay` marks them, label -1);
* `unlabelled` (`Needs.unlabelled`): every training image of the target, labels hidden;
  each batch then also holds `Needs.unlabelled` times as many of them (`u_image_u8`,
  `u_hw`, `u_index`);
* `train_batches(start_step)`: this host's rows of global training batches
  `start_step, start_step + 1, ...` as uint8 cache images (`image_u8`, `hw`, `label`),
  a pure function of the step (a resumed run reads exactly the batches it would have
  read);
* `views(batch, step)`: the JAX function the train step starts with, making the
  training views on the device (`views.batch.make_views`).

Every split is a uint8 cache (`bitune_jax.data.cache`) read through
`bitune_jax.data.pipeline`.
"""

import collections
import dataclasses
import logging
import queue as queue_lib
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from bitune_jax import sharding
from bitune_jax.data import cache, datasets, digits, pipeline, splits
from bitune_jax.data.spec import DataSpec, Needs, data_spec
from bitune_jax.data.views.batch import ViewSpec, make_views

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
  view_spec: ViewSpec
  val: Any = None  # held out of `train` to choose the best checkpoint
  unlabelled: Any = None  # every training image of the target, labels -1
  # The name of each label, as the dataset gives it (digits 5-9: "5".."9").
  class_names: tuple = ()

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    return self.stream(int(start_step))

  @property
  def views(self) -> Callable[[dict, Any], dict]:
    return make_views(self.view_spec)


def load(config: ml_collections.ConfigDict, needs: Needs) -> Input:
  """The `Input` of `config` for a method that needs `needs`."""
  return assemble(data_spec(config, needs))


def assemble(spec: DataSpec) -> Input:
  """The `Input` of `spec`: its source's splits, subset, held out, replayed and
  unlabelled as the module docstring says, each through the cache."""
  source = _source(spec)

  def split(name, keep, role, *, unlabelled=False, reader=source):
    return cached_split(spec, *reader.read(name, keep, role=role, unlabelled=unlabelled))

  keep, held = None, None
  if spec.sampling_rate < 100 or spec.kshot or spec.val_fraction > 0:
    labels = source.labels("train")
    keep = splits.train_subset(labels, rate=spec.sampling_rate, shots=spec.kshot,
                               seed=spec.seed, num_classes=source.num_classes,
                               class_names=source.class_names)
    if spec.val_fraction > 0:  # held out of the subset to choose the best checkpoint
      keep = np.arange(len(labels)) if keep is None else np.asarray(keep)
      rows, val_rows = splits.holdout_split(labels[keep], fraction=spec.val_fraction,
                                            seed=spec.seed)
      keep, held = keep[rows], keep[val_rows]
  train = split("train", keep, "train")
  val = None if held is None else split("train", held, "validation")
  test = split("test", None, "test")
  pool = train
  if spec.needs.replay_fraction > 0:
    replay = _replay_source(spec)
    total = replay.size("train")
    chosen = splits.replay_subset(total, fraction=spec.needs.replay_fraction,
                                  seed=spec.seed)
    log.info("replay: %d of %d %s images (%.0f%%)", len(chosen), total, replay.name,
             100 * spec.needs.replay_fraction)
    replayed = split("train", chosen, "replay", unlabelled=True, reader=replay)
    pool = pipeline.Concatenated(train, replayed)
  unlabelled = None
  if spec.needs.unlabelled:  # every training image of the target, labels hidden
    every = train if keep is None else split("train", None, "train-all")
    unlabelled = dataclasses.replace(every, labels=np.full(len(every), -1, np.int32))
  size = spec.image_size
  return Input(dataset=spec.dataset, num_classes=source.num_classes,
               image_shape=(size, size, 3), metric=source.metric, train=train,
               test=test, pool=pool, pool_is_replay=np.arange(len(pool)) >= len(train),
               stream=_stream(spec, pool, unlabelled), view_spec=spec.view_spec,
               val=val, unlabelled=unlabelled,
               class_names=tuple(str(n) for n in source.class_names))


def _source(spec):
  if spec.dataset == "digits":
    return digits.Source(spec.part)
  return datasets.Source(spec.dataset, data_dir=spec.data_dir, manual_dir=spec.manual_dir)


def _replay_source(spec):
  """The digits 0-4 for the digits, else `spec.replay_source`."""
  if spec.dataset == "digits":
    return digits.Source("source")
  return datasets.Source(spec.replay_source, data_dir=spec.data_dir,
                         manual_dir=spec.replay_manual_dir or spec.manual_dir)


def cached_split(spec: DataSpec, key: Mapping[str, Any], source: Sequence[Any],
                 labels: np.ndarray, name: str) -> pipeline.Split:
  """`source` (encoded images or uint8 arrays) through the cache, as a `Split`."""
  labels = np.asarray(labels, np.int32)
  c = cache.load(dict(key, count=len(labels)), source, side=spec.cache_side,
                 directory=spec.cache_dir, name=name, threads=spec.threads or None)
  return pipeline.Split(c.images, c.hw, labels, spec.image_size)


def _stream(spec, pool, unlabelled):
  """start_step -> this host's training batches: the pool's, with as many times
  `spec.needs.unlabelled` unlabelled images (`u_`) in each where asked."""
  def stream(start_step):
    labelled = pipeline.train_stream(pool, start_step=start_step,
                                     batch_size=spec.batch_size, seed=spec.seed)
    if unlabelled is None:
      return labelled
    others = pipeline.train_stream(
        unlabelled, start_step=start_step, stream=1, seed=spec.seed,
        batch_size=spec.batch_size * spec.needs.unlabelled)
    return ({**a, **{f"u_{k}": v for k, v in b.items() if k != "label"}}
            for a, b in zip(labelled, others))
  return stream


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
