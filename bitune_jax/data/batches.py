"""Step-indexed numpy batches: a resumed run reads exactly the batches it would have read.

The training example order is an endless concatenation of per-epoch permutations,
epoch e being `np.random.default_rng([seed, e]).permutation(N)`; batch `step` is
positions [step * B, (step + 1) * B) of that stream. Augmentation (a random translation:
zero-pad then crop back, no flips) is drawn per example and per view from
`np.random.default_rng([seed, step, view])`. Nothing depends on previous calls.
"""

import functools
import math
from collections.abc import Iterator

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_PAD = 4


def steps_per_epoch(n: int, batch_size: int) -> int:
  """Number of batches covering `n` examples once: ceil(n / batch_size)."""
  if int(n) != n or n < 0:
    raise ValueError(f"n must be a non-negative integer, got {n}")
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
  return math.ceil(int(n) / int(batch_size))


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed, epoch, n):
  """Read-only permutation of range(n) for one epoch (cached: consecutive steps share it)."""
  entropy = list(seed) if isinstance(seed, tuple) else [seed]
  perm = np.random.default_rng(entropy + [epoch]).permutation(n)
  perm.flags.writeable = False
  return perm


def stream_indices(n: int, *, step: int, batch_size: int,
                   seed: int | tuple[int, ...]) -> np.ndarray:
  """Example indices of batch `step`: positions [step*B, (step+1)*B) of the stream.

  Args:
    n: number of examples (>= 1).
    step: non-negative batch number.
    batch_size: B (>= 1; may exceed n, the batch then spans several epochs).
    seed: non-negative integer, or a tuple of them (e.g. (seed, host)).

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


def translate(images: np.ndarray, shifts: ArrayLike, *, fill: float = 0.0,
              index: ArrayLike | None = None) -> np.ndarray:
  """Shifts each image by (dy, dx) pixels, filling the uncovered border with `fill`.

  `out[b, y, x] = images[b, y - dy, x - dx]` where that is inside the image: the same as
  padding by max |shift| and cropping at offset (pad - dy, pad - dx). One slice copy per
  image (much faster than a fancy-indexed gather at 224 x 224).

  Args:
    images: [N, H, W, C].
    shifts: [B, 2] integers (dy, dx).
    fill: value of the uncovered pixels.
    index: optional [B] indices into `images` (gather and shift in one copy); by
      default B = N and image b is `images[b]`.

  Returns:
    A new array [B, H, W, C] of the dtype of `images`.
  """
  shifts = np.asarray(shifts).tolist()
  index = range(len(images)) if index is None else np.asarray(index).tolist()
  if len(index) != len(shifts):
    raise ValueError(f"{len(shifts)} shifts for {len(index)} images")
  height, width = images.shape[1:3]
  out = np.empty((len(index),) + images.shape[1:], images.dtype)
  for b, (i, (dy, dx)) in enumerate(zip(index, shifts)):
    if abs(dy) >= height or abs(dx) >= width:
      out[b] = fill  # Shifted out entirely.
      continue
    y0, y1, x0, x1 = max(dy, 0), height + min(dy, 0), max(dx, 0), width + min(dx, 0)
    out[b, y0:y1, x0:x1] = images[i, y0 - dy:y1 - dy, x0 - dx:x1 - dx]
    out[b, :y0] = fill
    out[b, y1:] = fill
    out[b, y0:y1, :x0] = fill
    out[b, y0:y1, x1:] = fill
  return out


def augment_shifts(batch_size: int, *, step: int, view: int, seed: int,
                   pad: int = DEFAULT_PAD) -> np.ndarray:
  """The (dy, dx) shifts [B, 2] of one view of batch `step`, uniform in [-pad, pad]."""
  rng = np.random.default_rng([seed, step, view])
  return rng.integers(-pad, pad + 1, size=(batch_size, 2))


def _check_train_args(images, labels, step, batch_size, seed, pad):
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  if len(images) == 0:
    raise ValueError("no training examples")
  if np.ndim(images) != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {np.shape(images)}")
  for name, value, low in (("step", step, 0), ("batch_size", batch_size, 1),
                           ("seed", seed, 0), ("pad", pad, 0)):
    if int(value) != value or value < low:
      raise ValueError(f"{name} must be an integer >= {low}, got {value}")


def train_batch(images: ArrayLike, labels: ArrayLike, *, step: int, batch_size: int,
                seed: int, two_views: bool = True, augment: bool = True,
                pad: int = DEFAULT_PAD, fill: float = 0.0) -> dict[str, np.ndarray]:
  """Training batch number `step`, a pure function of its arguments.

  Args:
    images: [N, H, W, C] array (float32 for the trainer).
    labels: [N] integer labels.
    step: non-negative batch number (the global training step).
    batch_size: B (may exceed N).
    seed: non-negative integer for the order and the augmentation.
    two_views: return two independently augmented views (`image_q`, `image_k`) of
      each example; otherwise one (`image`, equal to the `image_q` of two views).
    augment: apply the random translation; otherwise the views are the images.
    pad: maximum shift in pixels (zero-pad by `pad`, random crop back to H x W).
    fill: padding value. With normalised images 0 is the mean colour; for the digits
      a blank pixel is `digits.digits_background()`.

  Returns:
    dict of numpy arrays: `image_q`, `image_k` [B, H, W, C] (or `image`) and
    `label` [B] int32.
  """
  _check_train_args(images, labels, step, batch_size, seed, pad)
  step, batch_size, seed = int(step), int(batch_size), int(seed)
  idx = stream_indices(len(images), step=step, batch_size=batch_size, seed=seed)
  images = np.asarray(images)
  batch = {"label": np.asarray(labels)[idx].astype(np.int32)}
  names = ("image_q", "image_k") if two_views else ("image",)
  for view, name in enumerate(names):
    if augment:
      shifts = augment_shifts(batch_size, step=step, view=view, seed=seed, pad=pad)
      batch[name] = translate(images, shifts, fill=fill, index=idx)
    else:
      batch[name] = images[idx]
  return batch


def eval_batches(images: ArrayLike, labels: ArrayLike, *,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """All examples in order, in batches of `batch_size`; the last one padded, not dropped.

  Args:
    images: [N, ...] array.
    labels: [N] integer labels.
    batch_size: B (>= 1).

  Returns:
    An iterator of dicts with `image` [B, ...], `label` [B] int32 (0 for padding) and `mask` [B]
    float32 (1 for real examples, 0 for padding; sums to N over the iterator).
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  num_batches = steps_per_epoch(len(images), batch_size)  # Validates batch_size.
  return _padded_batches(images, labels, batch_size, num_batches)


def _padded_batches(images, labels, batch_size, num_batches):
  """The generator behind `eval_batches` (which checks its arguments eagerly)."""
  for i in range(num_batches):
    image = images[i * batch_size:(i + 1) * batch_size]
    label = labels[i * batch_size:(i + 1) * batch_size].astype(np.int32)
    real = len(image)
    mask = np.ones((batch_size,), np.float32)
    if real < batch_size:
      image = np.concatenate([image, np.zeros((batch_size - real,) + image.shape[1:],
                                              image.dtype)])
      label = np.concatenate([label, np.zeros((batch_size - real,), np.int32)])
      mask[real:] = 0.0
    yield {"image": image, "label": label, "mask": mask}
