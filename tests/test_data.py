"""Tests of bitune_jax.data: the digits transfer task and the step-indexed batches."""

import functools
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax.data import batches
from bitune_jax.data import digits

# Per-digit counts of sklearn's digits, and the 30% test split of each class worked out
# by hand: test = round_half_up(0.3 * n), e.g. 0.3 * 182 = 54.6 -> 55.
COUNTS = {0: 178, 1: 182, 2: 177, 3: 183, 4: 181, 5: 182, 6: 181, 7: 179, 8: 174, 9: 180}
TEST = {0: 53, 1: 55, 2: 53, 3: 55, 4: 54, 5: 55, 6: 54, 7: 54, 8: 52, 9: 54}
TARGET_TRAIN = [127, 127, 125, 122, 126]  # COUNTS - TEST for digits 5..9.
# round_half_up(rate / 100 * n) of TARGET_TRAIN, by hand (25% of 122 = 30.5 -> 31).
RATE_COUNTS = {
    15: [19, 19, 19, 18, 19],    # 19.05, 19.05, 18.75, 18.3, 18.9
    25: [32, 32, 31, 31, 32],    # 31.75, 31.75, 31.25, 30.5, 31.5
    50: [64, 64, 63, 61, 63],    # 63.5, 63.5, 62.5, 61, 63
    100: TARGET_TRAIN,
}


@functools.lru_cache(maxsize=None)
def _load(part, rate=100.0, seed=0, size=8):
  return digits.load_digits_transfer(part, image_size=size, sampling_rate=rate, seed=seed)


def _keys(images):
  """One hashable key per image, to compare sets of images across loads."""
  return [img.tobytes() for img in images]


def test_dataset_counts_and_split_sizes():
  assert np.bincount(digits._raw_digits()[1]).tolist() == list(COUNTS.values())
  for part, first in (("source", 0), ("target", 5)):
    data = _load(part)
    expected_test = [TEST[first + c] for c in range(5)]
    expected_train = [COUNTS[first + c] - TEST[first + c] for c in range(5)]
    assert np.bincount(data["test_labels"], minlength=5).tolist() == expected_test
    assert np.bincount(data["train_labels"], minlength=5).tolist() == expected_train
    assert data["num_classes"] == 5
    assert data["class_names"] == [str(first + c) for c in range(5)]
  assert expected_train == TARGET_TRAIN


def test_shapes_dtypes_and_normalisation():
  data = _load("target", size=32)
  assert data["train_images"].shape == (627, 32, 32, 3)
  assert data["test_images"].shape == (269, 32, 32, 3)
  assert data["train_images"].dtype == np.float32 and data["train_labels"].dtype == np.int32
  assert data["test_images"].dtype == np.float32 and data["test_labels"].dtype == np.int32
  np.testing.assert_array_equal(data["train_images"][..., 0], data["train_images"][..., 2])
  # At 8x8 (identity resize), all 1797 digits together have mean 0 and std 1.
  everything = np.concatenate([_load(p)[k] for p in ("source", "target")
                               for k in ("train_images", "test_images")])
  assert everything.shape == (1797, 8, 8, 3)
  assert abs(everything.mean()) < 1e-5 and abs(everything.std() - 1.0) < 1e-5
  mean, std = digits.digits_mean_std()
  assert everything.min() == pytest.approx(digits.digits_background(), abs=1e-5)
  assert everything.max() == pytest.approx((1.0 - mean) / std, abs=1e-5)


@pytest.mark.parametrize("size", [4, 8, 13, 32, 224])
def test_resize_matches_jax_bilinear(size):
  images = np.random.default_rng(size).random((3, 8, 8)).astype(np.float32)
  expected = jax.image.resize(jnp.asarray(images), (3, size, size), "bilinear")
  np.testing.assert_allclose(digits.resize_images(images, size), expected, atol=2e-6)


def test_target_relabelled_and_disjoint_from_source():
  source, target = _load("source"), _load("target")
  assert set(np.unique(target["train_labels"])) == set(range(5))
  src = set(_keys(source["train_images"])) | set(_keys(source["test_images"]))
  tgt_train, tgt_test = set(_keys(target["train_images"])), set(_keys(target["test_images"]))
  # sklearn's digits hold no duplicate image, so the key sets have the full sizes.
  assert len(src) == 901 and len(tgt_train) == 627 and len(tgt_test) == 269
  assert not tgt_train & tgt_test
  assert not src & (tgt_train | tgt_test)


def test_test_split_fixed_and_train_subsets_nested():
  full = _load("target")
  full_train = set(_keys(full["train_images"]))
  for rate, seed in ((15, 0), (15, 1), (25, 3), (50, 0), (100, 7)):
    data = _load("target", rate, seed)
    np.testing.assert_array_equal(data["test_images"], full["test_images"])
    np.testing.assert_array_equal(data["test_labels"], full["test_labels"])
    assert set(_keys(data["train_images"])) <= full_train
    assert set(np.unique(data["train_labels"])) == set(range(5))
  # A lower rate keeps a subset of a higher rate's images, for the same seed.
  assert set(_keys(_load("target", 15, 0)["train_images"])) <= set(
      _keys(_load("target", 50, 0)["train_images"]))
  # Different seeds draw different subsets; the same seed the same one.
  assert set(_keys(_load("target", 15, 0)["train_images"])) != set(
      _keys(_load("target", 15, 1)["train_images"]))
  again = digits.load_digits_transfer("target", image_size=8, sampling_rate=15, seed=1)
  np.testing.assert_array_equal(again["train_images"], _load("target", 15, 1)["train_images"])


@pytest.mark.parametrize("rate", [15, 25, 50, 100])
def test_sampling_rate_counts_by_hand(rate):
  data = _load("target", float(rate), 3)
  assert np.bincount(data["train_labels"], minlength=5).tolist() == RATE_COUNTS[rate]


def test_stratified_subset_generic():
  labels = np.array([7] * 10 + [-2] * 3 + [40] * 200)
  idx = digits.stratified_subset(labels, rate=1.0, seed=5)
  assert np.all(np.diff(idx) > 0) and idx.dtype == np.int64
  counts = {int(c): int((labels[idx] == c).sum()) for c in np.unique(labels)}
  assert counts == {-2: 1, 7: 1, 40: 2}  # max(1, round(0.01 * n)).
  assert np.array_equal(digits.stratified_subset(labels, rate=100, seed=0), np.arange(213))
  np.testing.assert_array_equal(idx, digits.stratified_subset(labels, rate=1.0, seed=5))
  for seed in range(3):  # A random draw, not the first members of each class.
    picked = digits.stratified_subset(labels, rate=10, seed=seed)
    assert not np.array_equal(picked[labels[picked] == 40], np.arange(13, 33))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(part="both"), r"part must be one of \['source', 'target'\], got 'both'"),
    (dict(part="source", sampling_rate=0.0), r"sampling_rate is a percentage in \(0, 100\]"),
    (dict(part="target", sampling_rate=100.5), r"percentage in \(0, 100\], got 100.5"),
    (dict(part="target", sampling_rate=-5), r"percentage in \(0, 100\], got -5"),
    (dict(part="target", test_fraction=1.0), r"test_fraction must be in \(0, 1\), got 1.0"),
    (dict(part="target", image_size=0), "image_size must be a positive integer, got 0"),
    (dict(part="target", seed=-1), "seed must be a non-negative integer, got -1")])
def test_load_bad_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    digits.load_digits_transfer(**kwargs)


def test_stratified_subset_bad_arguments():
  for rate in (0, -1, 101):
    with pytest.raises(ValueError, match="rate"):
      digits.stratified_subset(np.arange(4), rate=rate, seed=0)
  with pytest.raises(ValueError, match=r"labels must be 1-D, got shape \(2, 2\)"):
    digits.stratified_subset(np.zeros((2, 2), int), rate=50, seed=0)


# ----------------------------------------------------------------------------- batches


def _id_images(n, size=12, channels=3):
  """Images with no zero pixel, and labels equal to the example index (an id)."""
  rng = np.random.default_rng(n)
  images = rng.uniform(1.0, 2.0, (n, size, size, channels)).astype(np.float32)
  return images, np.arange(n, dtype=np.int32)


def test_steps_per_epoch():
  assert batches.steps_per_epoch(10, 5) == 2
  assert batches.steps_per_epoch(11, 5) == 3
  assert batches.steps_per_epoch(3, 8) == 1
  assert batches.steps_per_epoch(0, 8) == 0
  with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
    batches.steps_per_epoch(10, 0)


def test_train_batch_shapes_and_views():
  images, labels = _id_images(20)
  batch = batches.train_batch(images, labels, step=3, batch_size=8, seed=1)
  assert sorted(batch) == ["image_k", "image_q", "label"]
  assert batch["image_q"].shape == batch["image_k"].shape == (8, 12, 12, 3)
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
  single = batches.train_batch(images, labels, step=3, batch_size=8, seed=1, two_views=False)
  assert sorted(single) == ["image", "label"]
  np.testing.assert_array_equal(single["image"], batch["image_q"])
  plain = batches.train_batch(images, labels, step=3, batch_size=8, seed=1, augment=False)
  np.testing.assert_array_equal(plain["image_q"], images[plain["label"]])
  np.testing.assert_array_equal(plain["image_k"], images[plain["label"]])


def _recover_shift(view, source, pad=4):
  """The unique (dy, dx) with view == source shifted by it (zeros where uncovered)."""
  found = []
  for dy in range(-pad, pad + 1):
    for dx in range(-pad, pad + 1):
      shifted = np.roll(source, (dy, dx), axis=(0, 1))
      # Interior: where the shifted-back pixel exists; outside it, the zero padding.
      inside = np.zeros(source.shape[:2], bool)
      inside[max(dy, 0):source.shape[0] + min(dy, 0),
             max(dx, 0):source.shape[1] + min(dx, 0)] = True
      if (np.array_equal(view[inside], shifted[inside]) and
          not np.any(view[~inside])):
        found.append((dy, dx))
  assert len(found) == 1, found
  return found[0]


def test_views_are_translations_of_the_same_image():
  images, labels = _id_images(40)
  batch = batches.train_batch(images, labels, step=2, batch_size=16, seed=4)
  shifts_q, shifts_k = [], []
  for b, example in enumerate(batch["label"]):
    shifts_q.append(_recover_shift(batch["image_q"][b], images[example]))
    shifts_k.append(_recover_shift(batch["image_k"][b], images[example]))
  assert shifts_q != shifts_k  # The two views are augmented independently.
  assert len(set(shifts_q)) > 4  # Per example, not one shift for the whole batch.
  assert not np.array_equal(batch["image_q"], batch["image_k"])
  expected = batches.augment_shifts(16, step=2, view=0, seed=4).tolist()
  assert [list(s) for s in shifts_q] == expected


def test_translate_fill_and_full_shift():
  images = np.ones((2, 4, 4, 1), np.float32)
  out = batches.translate(images, np.array([[1, -2], [4, 0]]), fill=-3.0)
  assert out[0, 0].ravel().tolist() == [-3.0] * 4
  assert out[0, 1:, :2].ravel().tolist() == [1.0] * 6 and out[0, :, 2:].max() == -3.0
  assert np.all(out[1] == -3.0)


def test_train_batch_deterministic_and_order_independent():
  images, labels = _id_images(30)
  kwargs = dict(batch_size=7, seed=11)
  first = [batches.train_batch(images, labels, step=s, **kwargs) for s in range(12)]
  reverse = [batches.train_batch(images, labels, step=s, **kwargs) for s in reversed(range(12))]
  for a, b in zip(first, reversed(reverse)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other_seed = batches.train_batch(images, labels, step=0, batch_size=7, seed=12)
  assert not np.array_equal(other_seed["label"], first[0]["label"])


_RESUME_SCRIPT = """
import hashlib, sys
import numpy as np
from bitune_jax.data import batches

def digest(steps):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((50, 16, 16, 3)).astype(np.float32)
  labels = np.arange(50, dtype=np.int32)
  result = hashlib.sha256()
  for step in steps:
    batch = batches.train_batch(images, labels, step=step, batch_size=12, seed=9)
    for key in sorted(batch):
      result.update(batch[key].tobytes())
  return result.hexdigest()

if __name__ == "__main__":
  steps = [int(s) for s in sys.argv[1:]]
  digest(range(10))  # Read the earlier steps first (warm caches), then the ones compared.
  print(digest(steps))
"""


def test_resume_in_new_process_gives_same_batches(tmp_path):
  """Steps 7..9 are the same in a fresh process that read 0..9 first and in this one."""
  script = tmp_path / "resume.py"
  script.write_text(_RESUME_SCRIPT)
  child = subprocess.run([sys.executable, str(script), "7", "8", "9"], check=True,
                         capture_output=True, text=True).stdout.strip()
  namespace = {}
  exec(compile(_RESUME_SCRIPT, "resume", "exec"), namespace)  # Not as __main__.
  assert child == namespace["digest"]([7, 8, 9])
  assert child != namespace["digest"]([7, 8, 10])


@pytest.mark.parametrize("n,batch_size", [(24, 6), (24, 24), (25, 1)])
def test_each_example_once_per_epoch(n, batch_size):
  images, labels = _id_images(n)
  per_epoch = batches.steps_per_epoch(n, batch_size)
  for epoch in range(3):
    seen = np.concatenate([
        batches.train_batch(images, labels, step=epoch * per_epoch + s,
                            batch_size=batch_size, seed=2, augment=False)["label"]
        for s in range(per_epoch)])
    assert sorted(seen.tolist()) == list(range(n))
    perm = np.random.default_rng([2, epoch]).permutation(n)
    np.testing.assert_array_equal(seen, perm)


@pytest.mark.parametrize("n,batch_size,step", [(10, 4, 2), (10, 4, 7), (5, 12, 0), (5, 12, 3)])
def test_stream_crosses_epoch_boundaries(n, batch_size, step):
  images, labels = _id_images(n)
  stream = np.concatenate([np.random.default_rng([6, e]).permutation(n) for e in range(20)])
  batch = batches.train_batch(images, labels, step=step, batch_size=batch_size, seed=6,
                              two_views=False)
  np.testing.assert_array_equal(batch["label"], stream[step * batch_size:
                                                       (step + 1) * batch_size])
  assert batch["image"].shape[0] == batch_size


def test_train_batch_speed():
  images = np.random.default_rng(0).standard_normal((600, 32, 32, 3)).astype(np.float32)
  labels = np.zeros((600,), np.int32)
  times = []
  for step in range(30):
    start = time.perf_counter()
    batches.train_batch(images, labels, step=step, batch_size=32, seed=0)
    times.append(time.perf_counter() - start)
  assert np.median(times) < 5e-3, times


@pytest.mark.parametrize("n,batch_size", [(10, 4), (8, 4), (3, 5)])
def test_eval_batches_padding_and_mask(n, batch_size):
  images, labels = _id_images(n)
  labels = labels + 1  # So that padding (label 0) is distinguishable.
  out = list(batches.eval_batches(images, labels, batch_size=batch_size))
  assert len(out) == batches.steps_per_epoch(n, batch_size)
  mask = np.concatenate([b["mask"] for b in out])
  assert mask.sum() == n and mask.tolist() == [1.0] * n + [0.0] * (len(mask) - n)
  label = np.concatenate([b["label"] for b in out])
  np.testing.assert_array_equal(label[:n], labels)
  assert not label[n:].any() and label.dtype == np.int32
  image = np.concatenate([b["image"] for b in out])
  np.testing.assert_array_equal(image[:n], images)
  assert not image[n:].any()
  assert all(b["image"].shape == (batch_size, 12, 12, 3) for b in out)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(step=-1), "step must be an integer >= 0, got -1"),
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(seed=-2), "seed must be an integer >= 0, got -2"),
    (dict(pad=-1), "pad must be an integer >= 0, got -1"),
    (dict(labels_len=3), "5 images but 3 labels"),
    (dict(n=0), "no training examples")])
def test_train_batch_bad_arguments(kwargs, needle):
  images, labels = _id_images(kwargs.pop("n", 5))
  labels = labels[:kwargs.pop("labels_len", len(labels))]
  args = dict(step=0, batch_size=2, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=needle):
    batches.train_batch(images, labels, **args)


def test_eval_batches_bad_arguments():
  images, labels = _id_images(5)
  with pytest.raises(ValueError, match="5 images but 4 labels"):
    batches.eval_batches(images, labels[:4], batch_size=2)
  with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
    batches.eval_batches(images, labels, batch_size=0)
