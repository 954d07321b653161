"""The papers' datasets through tfds: which splits, how many classes, which metric, and
a `Source` that reads them.

Training on `train_split`, testing on `test_split`; the metric the papers report:
mean per-class accuracy for Aircraft, Pets, Caltech-101 and Flowers, top-1 otherwise.
A dataset not prepared yet is prepared by process 0 (downloaded by tfds, or built from
a manual download by `bitune_jax.data.builders`).

`Source(name, data_dir=..., manual_dir=...)` reads a split's labels, and its images
(encoded, read from tfds only when its cache is built: a cache built before is
memory-mapped without reading them) with the key that names them in the cache. Which
examples a run takes is `bitune_jax.data.input`'s business.
"""

import collections.abc
import dataclasses
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bitune_jax.data import cache

if TYPE_CHECKING:  # tensorflow is imported where it is used, not with this module
  import tensorflow_datasets as tfds

log = logging.getLogger("bitune_jax")


@dataclasses.dataclass(frozen=True)
class Spec:
  tfds_name: str
  num_classes: int
  train_split: str
  test_split: str
  metric: str = "top1"  # or "mean_class_acc"
  manual: bool = False  # built from a manual download directory


MEAN_CLASS = "mean_class_acc"
SPECS = {
    "cub": Spec("caltech_birds2011", 200, "train", "test"),
    "cars": Spec("cars196", 196, "train", "test"),
    "aircraft": Spec("fgvc_aircraft", 100, "train+validation", "test", MEAN_CLASS, True),
    "pets": Spec("oxford_iiit_pet", 37, "train", "test", MEAN_CLASS),
    # tfds' Caltech-101 has 102 labels (with the background class): 3060 = 30 x 102
    # training images, the count the unsupervised fine-tuning paper uses.
    "caltech101": Spec("caltech101", 102, "train", "test", MEAN_CLASS),
    "cifar100": Spec("cifar100", 100, "train", "test"),
    "food101": Spec("food101", 101, "train", "validation"),
    "flowers": Spec("oxford_flowers102", 102, "train+validation", "test", MEAN_CLASS),
    "dtd": Spec("dtd", 47, "train+validation", "test"),
    "coco70": Spec("coco70", 70, "train", "test", manual=True),
    "imagenet": Spec("imagenet2012", 1000, "train", "validation", manual=True),
}


def spec(name: str) -> Spec:
  if name not in SPECS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(SPECS)}")
  return SPECS[name]


# --------------------------------------------------------------------------- builders
def builder(name: str, *, data_dir: str = "",
            manual_dir: str = "") -> "tfds.core.DatasetBuilder":
  """The prepared tfds builder of dataset `name`. One not prepared yet in `data_dir` is
  prepared first, by process 0 while the others wait (downloaded by tfds, or built from
  `manual_dir`)."""
  import jax  # pylint: disable=g-import-not-at-top
  s = spec(name)
  if jax.process_index() == 0:
    _prepare(name, s, data_dir, manual_dir)
  _sync("prepared " + s.tfds_name)
  return _prepare(name, s, data_dir, manual_dir)  # prepared by now: opens it


def _prepare(name, s, data_dir, manual_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from bitune_jax.data import builders  # pylint: disable=g-import-not-at-top  (registers)
  if s.tfds_name in builders.BUILDERS:
    return builders.prepare(s.tfds_name, data_dir=data_dir or None,
                            manual_dir=manual_dir or None)
  b = tfds.builder(s.tfds_name, data_dir=data_dir or None)
  if b.is_prepared():
    return b
  how = (f"Prepare it where there is a network with `tfds build {s.tfds_name} "
         f"--data_dir DIR`, copy DIR here and pass --config.data.data_dir=DIR" +
         (" (or give the manual download: --config.data.manual_dir=DIR)" if s.manual
          else ""))
  host = None if manual_dir else _unreachable_host(getattr(b, "url_infos", None) or {})
  if host:  # fail in seconds, not after minutes of download retries
    raise ValueError(f"dataset {name!r} (tfds {s.tfds_name}) is not prepared in "
                     f"{b.data_dir}, and its download host {host} cannot be reached "
                     f"(no network?). {how}.")
  log.info("preparing tfds %s in %s", s.tfds_name, b.data_dir)
  try:
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir or None))
  except Exception as e:
    manual = " (and --config.data.manual_dir=DIR for the manual download)"
    raise ValueError(f"dataset {name!r} (tfds {s.tfds_name}) is not prepared in "
                     f"{b.data_dir} and could not be prepared: {e}. Prepare it with "
                     f"`tfds build {s.tfds_name} --data_dir DIR` and pass "
                     f"--config.data.data_dir=DIR" + (manual if s.manual else "")) from e
  return b


def _unreachable_host(urls, timeout=5.0):
  """The first download host of `urls` that does not answer a TCP connection within
  `timeout` seconds, or None (all answer, or nothing to download)."""
  for url in urls:
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
      continue
    port = parts.port or (21 if parts.scheme == "ftp" else
                          80 if parts.scheme == "http" else 443)
    try:
      socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError:
      return parts.hostname
    return None  # one answering host: the network is there
  return None


def _sync(name):
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _components(b, split):
  """`[(component, global offset, size or None)]` of a split such as 'train+validation'."""
  out, offset = [], 0
  for part in split.split("+"):
    info = b.info.splits.get(part) if hasattr(b.info.splits, "get") else None
    size = info.num_examples if info is not None and info.num_examples else None
    out.append((part, offset, size))
    offset = None if size is None or offset is None else offset + size
  return out


def _read(b: "tfds.core.DatasetBuilder", split: str, *,
          fields: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
  """Yields numpy batches (`tfds_index`, `fields`) of the whole of `split`, in order."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  offset = 0
  for part, _, size in _components(b, split):
    ds = b.as_dataset(split=part, shuffle_files=False,
                      decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.enumerate().map(lambda i, ex, base=offset: dict(
        {k: ex[k] for k in fields}, tfds_index=i + base))
    seen = 0
    for batch in ds.batch(1024).prefetch(2).as_numpy_iterator():
      seen += len(batch["tfds_index"])
      yield batch
    offset += size if size is not None else seen


def read_labels(b: "tfds.core.DatasetBuilder", split: str) -> np.ndarray:
  """Labels `[N]` int32 of the whole split, in order."""
  labels = [batch["label"] for batch in _read(b, split, fields=("label",))]
  return np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32)


def read_encoded(b: "tfds.core.DatasetBuilder", split: str, *,
                 keep: np.ndarray | None = None, unlabelled: bool = False,
                 name: str = "") -> tuple[list[bytes], np.ndarray]:
  """`(encoded images, labels [n] int32)` of `split` (the sorted indices `keep`, or all),
  in order, with progress in the log."""
  encoded, labels, start, shown = [], [], time.perf_counter(), time.perf_counter()
  fields = ("image",) if unlabelled else ("image", "label")
  for batch in _read(b, split, fields=fields):
    chosen = (np.ones(len(batch["tfds_index"]), bool) if keep is None else
              np.isin(batch["tfds_index"], keep))
    encoded.extend(batch["image"][chosen])
    labels.append(np.full(chosen.sum(), -1, np.int32) if unlabelled else
                  batch["label"][chosen].astype(np.int32))
    if time.perf_counter() - shown > 10:
      shown = time.perf_counter()
      log.info("reading %s %s: %d examples kept (%.0f s)", name or b.name, split,
               len(encoded), shown - start)
  labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
  log.info("%s %s: %d examples, %.0f s", name or b.name, split, len(labels),
           time.perf_counter() - start)
  return encoded, labels


class _Deferred(collections.abc.Sequence):
  """The encoded images of a split, read from tfds on first use only: a cache that is
  already built is memory-mapped without reading them (a second run reads only the
  labels). The labels read with the images must be those the cache was keyed with."""

  def __init__(self, labels, read):
    self._labels, self._read, self._items = labels, read, None
    self._lock = threading.Lock()

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, index):
    with self._lock:
      if self._items is None:
        items, labels = self._read()
        if len(items) != len(self._labels) or not np.array_equal(labels, self._labels):
          raise ValueError(f"the split changed while it was read: {len(items)} images "
                           f"and their labels do not match the {len(self._labels)} "
                           "labels read before")
        self._items = items
    return self._items[index]


class Source:
  """A tfds dataset of `SPECS`, as `bitune_jax.data.input` reads it: splits "train"
  and "test" (the spec's `train_split` and `test_split`)."""

  def __init__(self, name: str, *, data_dir: str = "", manual_dir: str = ""):
    s = spec(name)
    self.builder = builder(name, data_dir=data_dir, manual_dir=manual_dir)
    classes = self.builder.info.features["label"].num_classes
    if classes != s.num_classes:
      raise ValueError(f"tfds {s.tfds_name} has {classes} classes, expected "
                       f"{s.num_classes}")
    self.name, self.num_classes, self.metric = name, s.num_classes, s.metric
    self.class_names = tuple(self.builder.info.features["label"].names)
    self._splits = {"train": s.train_split, "test": s.test_split}
    self._labels = {}

  def labels(self, split: str) -> np.ndarray:
    """Labels `[N]` int32 of the whole split, read once."""
    if split not in self._labels:
      self._labels[split] = read_labels(self.builder, self._splits[split])
    return self._labels[split]

  def size(self, split: str) -> int:
    """The number of examples of the split (from tfds' metadata where it has it)."""
    parts = _components(self.builder, self._splits[split])
    if any(size is None for _, _, size in parts):
      return len(self.labels(split))  # counted by reading
    return sum(size for _, _, size in parts)

  def read(self, split: str, keep: np.ndarray | None, *, role: str,
           unlabelled: bool = False) -> tuple[dict[str, Any], Sequence, np.ndarray, str]:
    """`(cache key, encoded images, labels, cache name)` of the examples `keep` (sorted
    indices, or None: all) of `split`, for `role` ("train", "validation", "test",
    "replay", "train-all"). `unlabelled`: labels -1, and only the count is read."""
    b, name = self.builder, self._splits[split]
    if unlabelled:
      count = (len(keep) if keep is not None else
               sum(len(batch["tfds_index"]) for batch in _read(b, name, fields=())))
      labels = np.full(count, -1, np.int32)
    else:
      labels = self.labels(split)
      labels = labels if keep is None else labels[np.asarray(keep)]
    encoded = _Deferred(labels, lambda: read_encoded(
        b, name, keep=keep, unlabelled=unlabelled,
        name=role if role in ("validation", "replay") else ""))
    key = {"dataset": self.name, "tfds": b.info.full_name, "split": name,
           "rows": "all" if keep is None else cache.rows_key(np.asarray(keep, np.int64))}
    stem = role if role in ("validation", "replay") else name
    return key, encoded, labels, f"{b.name}-{stem}".replace("+", "_")
