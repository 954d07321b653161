"""tf.data over encoded images held in memory: training streams and evaluation batches.

Every host keeps a split as encoded bytes (`EncodedSplit`), so an epoch reads no files
and any step's batch is at hand: global batch `step` is positions `[step * B, (step +
1) * B)` of one endless stream of per-epoch permutations (`batches.stream_indices`,
seeded by the run's seed), and each host decodes and augments (tf.data, in parallel)
only its rows of it. Each example's views are seeded by (seed, step, row of the global
batch, view): the two views of an image differ, the global batch is the same for any
number of hosts, and a run resumed at step s reads exactly the batches an uninterrupted
run reads from step s on. Evaluation batches are likewise the global padded batches,
each host taking its rows.
"""

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from bitune_jax.data import batches, views


@dataclasses.dataclass
class EncodedSplit:
  """A split's examples, encoded images and labels, in memory (on every host)."""
  encoded: np.ndarray  # [n] object (bytes)
  labels: np.ndarray  # [n] int32 (-1: unlabelled)
  num_examples: int  # n
  max_local: int  # n (kept for readers of older code: every host holds the split)
  image_size: int  # side of the evaluation view

  def __len__(self):
    return len(self.labels)

  def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of padded global eval batches of `batch_size` (see `eval_batches`)."""
    return eval_batches(self, batch_size=batch_size)


def concatenate(first: EncodedSplit, second: EncodedSplit) -> EncodedSplit:
  """`first` then `second` (e.g. a target split and replayed source examples)."""
  return EncodedSplit(np.concatenate([first.encoded, second.encoded]),
                      np.concatenate([first.labels, second.labels]),
                      first.num_examples + second.num_examples,
                      first.max_local + second.max_local, first.image_size)


def _options(threads=None):
  options = tf.data.Options()
  options.deterministic = True
  if threads:
    options.threading.private_threadpool_size = threads
  return options


def local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f"batch size {batch_size} does not split over {process_count} hosts")
  return batch_size // process_count


def eval_batches(split: EncodedSplit, *, batch_size: int,
                 process_count: int | None = None,
                 process_index: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This host's rows of the evaluation view of every example, in order, padded to
  whole global batches.

  The global batches are `ceil(n / batch_size)` batches of `batch_size` rows; each host
  yields rows `[i * local, (i + 1) * local)` of each (`local = batch_size / hosts`):
  `image` [local, S, S, 3] float32, `label` [local] int32, `mask` [local] float32 (0 for
  padding).
  """
  import jax  # pylint: disable=g-import-not-at-top
  count = jax.process_count() if process_count is None else process_count
  index = jax.process_index() if process_index is None else process_index
  local = local_batch_size(batch_size, count)
  if len(split) == 0:
    raise ValueError("the split holds no example")
  padded = -(-len(split) // batch_size) * batch_size
  rows = (np.arange(padded).reshape(-1, batch_size)[:, index * local:(index + 1) * local]
          .reshape(-1))
  real = rows < len(split)
  rows = np.where(real, rows, 0)  # padding: the first example, masked out
  encoded = split.encoded[rows].astype(object)
  labels = np.where(real, split.labels[rows], 0).astype(np.int32)
  mask = real.astype(np.float32)
  view = functools.partial(views.eval_view, size=split.image_size,
                           resize=views.eval_resize(split.image_size))
  ds = tf.data.Dataset.from_tensor_slices(
      {"encoded": encoded, "label": labels, "mask": mask})
  ds = ds.map(lambda ex: {"image": view(ex["encoded"]), "label": ex["label"],
                          "mask": ex["mask"]},
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local).prefetch(2).with_options(_options())
  return ds.as_numpy_iterator()


def view_fn(kind: str, *, size: int, jitter: Sequence[float] | None = None
            ) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """`fn(encoded, seed) -> image` for `kind` 'reference' or 'moco'."""
  if kind == "reference":
    return functools.partial(views.train_view, size=size, resize=views.eval_resize(size),
                             jitter=jitter)
  if kind == "moco":
    return functools.partial(views.moco_view, size=size)
  raise ValueError(f"data.views must be 'reference' or 'moco', got {kind!r}")


def train_stream(pool: EncodedSplit, *, start_step: int, batch_size: int, seed: int,
                 view: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
                 two_views: bool = True, host: tuple[int, int] = (0, 1),
                 threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This host's rows of training batches `start_step, start_step + 1, ...`.

  Args:
    pool: this host's `EncodedSplit` to draw from.
    start_step: the first batch's step.
    batch_size: the global batch size (each host yields batch_size / hosts rows).
    seed: the run's seed (order and views).
    view: `fn(encoded, seed [2]) -> float32 image` (`view_fn`).
    two_views: yield `image_q`, `image_k` (two views); else `image`.
    host: (process index, process count).
    threads: tf.data private thread pool size (default: tf.data's).

  Returns:
    An iterator of numpy dicts: `image_q`, `image_k` (or `image`) [b, S, S, 3] float32
    and `label` [b] int32.
  """
  index, count = host
  local = local_batch_size(batch_size, count)
  if len(pool) == 0:
    raise ValueError("no training examples")
  encoded, labels = pool.encoded.astype(object), pool.labels.astype(np.int32)
  rows = np.arange(index * local, (index + 1) * local)  # this host's rows

  def positions():
    step = int(start_step)
    while True:
      idx = batches.stream_indices(len(labels), step=step, batch_size=batch_size,
                                   seed=(int(seed), 0))[rows]
      yield {"encoded": encoded[idx], "label": labels[idx],
             "step": np.full(local, step, np.int64), "row": rows}
      step += 1

  signature = {"encoded": tf.TensorSpec([local], tf.string),
               "label": tf.TensorSpec([local], tf.int32),
               "step": tf.TensorSpec([local], tf.int64),
               "row": tf.TensorSpec([local], tf.int64)}
  names = ("image_q", "image_k") if two_views else ("image",)

  def augment(ex):
    image, out = views.decode(ex["encoded"]), {"label": ex["label"]}  # decoded once
    for number, name in enumerate(names):
      out[name] = view(image, views.example_seed(seed, 0, ex["step"], ex["row"],
                                                 number))
    return out

  ds = tf.data.Dataset.from_generator(positions, output_signature=signature)
  ds = ds.unbatch().map(augment, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local, drop_remainder=True).prefetch(2).with_options(_options(threads))
  return ds.as_numpy_iterator()
