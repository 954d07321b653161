"""Tests of bitune_jax.data: the digits transfer task and the step-indexed example order."""

import functools
import subprocess
import sys

import numpy as np
import pytest

from bitune_jax.data import digits, pipeline, splits

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


def test_shapes_dtypes_and_the_eval_view():
  data = _load("target", size=32)
  assert data["train_images"].shape == (627, 32, 32, 3)
  assert data["test_images"].shape == (269, 32, 32, 3)
  assert data["train_images"].dtype == np.float32 and data["train_labels"].dtype == np.int32
  assert data["test_images"].dtype == np.float32 and data["test_labels"].dtype == np.int32
  np.testing.assert_allclose(data["train_images"][..., 0] * 0.229 + 0.485,
                             data["train_images"][..., 2] * 0.225 + 0.406, atol=1e-6)
  # The uint8 digits are sklearn's 0..16 levels scaled to 0..255.
  raw = digits.raw_uint8()
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  bunch = load_digits()
  np.testing.assert_array_equal(raw, np.round(bunch.images / 16 * 255))
  np.testing.assert_array_equal(digits._raw_digits()[1], bunch.target)  # pylint: disable=protected-access
  # The eval view by hand: PIL bilinear resize of the grey digit to 37 x 37
  # (round(32 * 256 / 224)), its centre 32 x 32 (offset 2), normalised.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rows = digits.transfer_indices("target")["test_rows"][:5]
  for got, image in zip(data["test_images"][:5], raw[rows]):
    big = np.asarray(Image.fromarray(image).convert("RGB").resize((37, 37),
                                                                  Image.BILINEAR))
    crop = big[2:34, 2:34] / 255.0
    expected = (crop - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(got, expected, atol=1e-5)


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
  idx = splits.stratified_subset(labels, rate=1.0, seed=5)
  assert np.all(np.diff(idx) > 0) and idx.dtype == np.int64
  counts = {int(c): int((labels[idx] == c).sum()) for c in np.unique(labels)}
  assert counts == {-2: 1, 7: 1, 40: 2}  # max(1, round(0.01 * n)).
  assert np.array_equal(splits.stratified_subset(labels, rate=100, seed=0), np.arange(213))
  np.testing.assert_array_equal(idx, splits.stratified_subset(labels, rate=1.0, seed=5))
  for seed in range(3):  # A random draw, not the first members of each class.
    picked = splits.stratified_subset(labels, rate=10, seed=seed)
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
      splits.stratified_subset(np.arange(4), rate=rate, seed=0)
  with pytest.raises(ValueError, match=r"labels must be 1-D, got shape \(2, 2\)"):
    splits.stratified_subset(np.zeros((2, 2), int), rate=50, seed=0)


# ----------------------------------------------------------------------------- order
_RESUME_SCRIPT = """
import hashlib, sys
from bitune_jax.data import pipeline
from bitune_jax.training import loop

def digest(steps):
  result = hashlib.sha256()
  for step in steps:
    result.update(pipeline.stream_indices(50, step=step, batch_size=12,
                                          seed=(9, 0)).tobytes())
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
  per_epoch = n // batch_size  # the batches of one epoch (n is a multiple here)
  for epoch in range(3):
    seen = np.concatenate([
        pipeline.stream_indices(n, step=epoch * per_epoch + s, batch_size=batch_size,
                                seed=2) for s in range(per_epoch)])
    assert sorted(seen.tolist()) == list(range(n))
    perm = np.random.default_rng([2, epoch]).permutation(n)
    np.testing.assert_array_equal(seen, perm)


@pytest.mark.parametrize("n,batch_size,step", [(10, 4, 2), (10, 4, 7), (5, 12, 0), (5, 12, 3)])
def test_stream_crosses_epoch_boundaries(n, batch_size, step):
  stream = np.concatenate([np.random.default_rng([6, 0, e]).permutation(n)
                           for e in range(20)])
  idx = pipeline.stream_indices(n, step=step, batch_size=batch_size, seed=(6, 0))
  np.testing.assert_array_equal(idx, stream[step * batch_size:(step + 1) * batch_size])


def _demo_input(**data):
  import os  # pylint: disable=g-import-not-at-top
  from bitune_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
  from bitune_jax.data.spec import Needs  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
  import finetune as finetune_config  # pylint: disable=g-import-not-at-top
  config = finetune_config.get_config("demo")
  config.image_size = 16
  for key, value in data.items():
    if key == "sampling_rate":
      config.sampling_rate = value
    else:
      config.data[key] = value
  return config, input_lib.load(config, Needs())


def test_kshot_draws_from_the_whole_split_whatever_the_rate():
  """k-shot ignores sampling_rate: 40 per class, more than the 31-32 that a 25% subset
  keeps, the same images at rate 25 and 100."""
  _, low = _demo_input(kshot=40, sampling_rate=25.0)
  _, full = _demo_input(kshot=40, sampling_rate=100.0)
  np.testing.assert_array_equal(np.bincount(low.train.labels), [40] * 5)
  np.testing.assert_array_equal(low.train.labels, full.train.labels)
  np.testing.assert_array_equal(np.asarray(low.train.images), np.asarray(full.train.images))


def test_kshot_more_than_a_class_has_is_an_error(tmp_path):
  """Digit 8 has 122 training images (TARGET_TRAIN): kshot=123 names it, before the run
  compiles or writes anything."""
  from bitune_jax.training import loop  # pylint: disable=g-import-not-at-top
  config, _ = _demo_input(kshot=122)  # every class has 122 or more
  config.data.kshot = 123
  with pytest.raises(ValueError, match="class 8 has only 122 training images"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
