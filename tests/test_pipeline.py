"""The tfds input pipelines: every dataset name of the configs through tfds (mocked:
nothing is downloaded), sampling-rate and k-shot splits, labels that match pixels
through decoding and augmentation, resumable seeded streams, host shards, source replay
and the aircraft command line on a fake copy of the official archive."""

import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from PIL import Image

from bitune_jax import methods
from bitune_jax.data import cache, datasets, pipeline, splits
from bitune_jax.data import input as input_lib
from bitune_jax.data.spec import Needs, cache_side, data_spec
from bitune_jax.data.views import batch as views_batch
from bitune_jax.data.views import crop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bituning as bituning_config  # noqa: E402  pylint: disable=g-import-not-at-top
import fakes  # noqa: E402  pylint: disable=g-import-not-at-top
import unsup_finetune as unsup_config  # noqa: E402  pylint: disable=g-import-not-at-top

SIZE = 16  # view side in these tests
SIDE = 18  # the cache side for it: round(16 * 256 / 224)
PER_CLASS = {"train": 4, "validation": 1, "test": 2}  # mock examples per class


def colour(k):
  """A flat colour per class (216 classes, 51 apart per channel)."""
  return np.array([k % 6, k // 6 % 6, k // 36 % 6]) * 51


def label_of(image):
  """The class whose colour is nearest the mean colour of a normalised view."""
  rgb = (image.reshape(-1, 3).mean(0) * crop.STD_RGB + crop.MEAN_RGB) * 255
  level = np.clip(np.round(rgb / 51), 0, 5).astype(int)
  return int(level[0] + 6 * level[1] + 36 * level[2])


def mock_examples(num_classes, split, seed=0):
  """`(encoded, labels)` of a mock split: class-coloured JPEGs of random sizes."""
  rng = np.random.default_rng([seed, len(split)])
  labels = np.repeat(np.arange(num_classes), PER_CLASS[split])
  rng.shuffle(labels)
  encoded = []
  for label in labels:
    h, w = rng.integers(12, 40, 2)
    image = np.broadcast_to(colour(label), (h, w, 3)).astype(np.uint8)
    encoded.append(tf.io.encode_jpeg(image, quality=95).numpy())
  return encoded, labels


def fake_as_dataset(self, split, **kwargs):
  """Stands for a prepared tfds split read with the image left encoded."""
  del kwargs
  encoded, labels = mock_examples(self.info.features["label"].num_classes, str(split))
  return tf.data.Dataset.from_tensor_slices({"image": encoded,
                                             "label": labels.astype(np.int64)})


@pytest.fixture
def mocked(monkeypatch):
  with fakes.mocked_tfds(monkeypatch, fake_as_dataset):
    yield


def _config(name, rate=100, module=bituning_config, **data):
  config = module.get_config(f"{name},resnet18,{rate}")
  config.image_size, config.batch_size, config.eval_batch_size = SIZE, 8, 16
  config.data.data_dir = "/tmp/non-existing/tfds"
  for key, value in data.items():
    config.data[key] = value
  return config


# --------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("name", ["cub", "cars", "pets", "caltech101", "cifar100",
                                  "food101", "flowers", "dtd"])
def test_every_tfds_dataset_of_the_configs_loads(mocked, name):
  config = _config(name, rate=25)
  data = input_lib.load(config, methods.data_needs(config))
  spec = datasets.SPECS[name]
  assert data.num_classes == config.num_classes == spec.num_classes
  assert data.metric == spec.metric
  per_class = PER_CLASS["train"] + (PER_CLASS["validation"] if "+" in spec.train_split
                                    else 0)
  kept = max(1, splits.round_half_up(0.25 * per_class))  # every class present
  np.testing.assert_array_equal(np.bincount(data.train.labels), [kept] * spec.num_classes)
  test_per_class = PER_CLASS["validation" if spec.test_split == "validation" else "test"]
  assert len(data.test) == test_per_class * spec.num_classes
  batch = next(data.train_batches(0))
  assert batch["image_u8"].shape == (8, SIDE, SIDE, 3)
  assert batch["image_u8"].dtype == np.uint8
  batch = _views(data, batch, step=0)
  assert batch["image_q"].shape == batch["image_k"].shape == (8, SIZE, SIZE, 3)
  for i, label in enumerate(batch["label"]):  # pixels and labels travel together
    assert label_of(batch["image_q"][i]) == label_of(batch["image_k"][i]) == label
  assert not np.array_equal(batch["image_q"], batch["image_k"])  # two views


def test_metrics_follow_the_papers():
  mean_class = {n for n, s in datasets.SPECS.items() if s.metric == "mean_class_acc"}
  assert mean_class == {"aircraft", "pets", "caltech101", "flowers"}


def test_eval_batches_cover_the_split_once_in_the_eval_view(mocked):
  data = input_lib.load(_config("dtd"), Needs())
  seen, labels = 0, []
  for batch in data.test.batches(16):
    assert batch["image"].shape == (16, SIZE, SIZE, 3)
    real = batch["mask"] > 0
    labels.extend(batch["label"][real])
    assert [label_of(x) for x in batch["image"][real]] == list(batch["label"][real])
    seen += real.sum()
  encoded, expected = mock_examples(47, "test")
  assert seen == len(encoded) and labels == list(expected)  # in order, once each
  # The eval view by hand: PIL decodes, resizes to SIDE x SIDE (bilinear), centre crop.
  image = Image.open(io.BytesIO(encoded[0])).convert("RGB").resize((SIDE, SIDE),
                                                                    Image.BILINEAR)
  crop = np.asarray(image)[1:1 + SIZE, 1:1 + SIZE] / 255.0
  first = (crop - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(next(data.test.batches(16))["image"][0], first, atol=1e-5)


def test_kshot_and_sampling_rates_by_class(mocked):
  for rate in (15, 30, 50, 75):
    data = input_lib.load(_config("cifar100", rate), Needs())
    assert np.bincount(data.train.labels).tolist() == [
        max(1, splits.round_half_up(rate / 100 * 4))] * 100
  data = input_lib.load(_config("pets", kshot=2), Needs())
  assert np.bincount(data.train.labels).tolist() == [2] * 37
  again = input_lib.load(_config("pets", kshot=2), Needs())
  np.testing.assert_array_equal(again.train.images, data.train.images)  # by seed
  np.testing.assert_array_equal(again.train.labels, data.train.labels)


def test_missing_class_is_refused():
  labels = np.array([0, 0, 2, 2])
  with pytest.raises(ValueError, match="2 classes with examples, expected 3"):
    splits.train_subset(labels, rate=50, shots=0, seed=0, num_classes=3)


# --------------------------------------------------------------------------- stream
def _pool(n=21, size=SIZE):
  encoded, labels = mock_examples(n, "validation")
  c = cache.load({"test": "pool", "n": n}, encoded, side=crop.eval_resize(size),
                 directory="")
  return pipeline.Split(c.images, c.hw, labels.astype(np.int32), size)


def _views(data_or_spec, batch, *, step):
  """The device views of a host batch, as the train step makes them."""
  views = (data_or_spec.views if hasattr(data_or_spec, "views") else
           views_batch.make_views(data_or_spec))
  return jax.device_get(jax.jit(views)(batch, step))


@pytest.mark.parametrize("kind", ["reference", "moco"])
def test_stream_resumes_exactly_and_views_are_seeded(kind):
  pool = _pool()
  spec = views_batch.ViewSpec(kind=kind, size=SIZE, seed=0, two_views=True)
  stream = lambda start, seed=0: pipeline.train_stream(  # noqa: E731
      pool, start_step=start, batch_size=8, seed=seed)
  straight = [b for _, b in zip(range(5), stream(0))]
  resumed = [b for _, b in zip(range(2), stream(3))]
  for a, b in zip(straight[3:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # One epoch (21 examples) then the next: every example once per epoch.
  labels = np.concatenate([b["label"] for b in straight])
  np.testing.assert_array_equal(np.sort(labels[:21]), np.arange(21))
  batch = _views(spec, straight[0], step=0)
  other = _views(views_batch.ViewSpec(kind=kind, size=SIZE, seed=1, two_views=True),
                 straight[0], step=0)
  assert not np.array_equal(other["image_q"], batch["image_q"])
  assert not np.array_equal(batch["image_q"], batch["image_k"])
  later = _views(spec, straight[0], step=1)  # the same images at another step
  assert not np.array_equal(later["image_q"], batch["image_q"])
  if kind == "reference":  # flat colours survive the reference views
    assert [label_of(x) for x in batch["image_k"]] == list(batch["label"])


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_take_their_rows_of_the_same_global_batches(hosts):
  """Training and evaluation batches do not depend on the host count: host h's rows of
  step s are rows [h * B/H, (h+1) * B/H) of the one-host batch, the same images (and
  the views are drawn in the step from the global row). This is what lets 2 processes
  train as 1 and a checkpoint resume on any number of hosts."""
  pool = _pool(n=21)
  one = [b for _, b in zip(range(4), pipeline.train_stream(
      pool, start_step=3, batch_size=8, seed=5, process_count=1, process_index=0))]
  parts = [[b for _, b in zip(range(4), pipeline.train_stream(
      pool, start_step=3, batch_size=8, seed=5, process_count=hosts, process_index=h))]
           for h in range(hosts)]
  for step, batch in enumerate(one):
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([part[step][key] for part in parts]), batch[key])
  one = list(pipeline.eval_batches(pool, batch_size=8, process_count=1))
  parts = [list(pipeline.eval_batches(pool, batch_size=8, process_count=hosts,
                                      process_index=h)) for h in range(hosts)]
  assert len(one) == 3 and all(len(p) == 3 for p in parts)  # 21 rows padded to 24
  for i, batch in enumerate(one):
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([part[i][key] for part in parts]), batch[key])
  assert one[-1]["mask"].tolist() == [1] * 5 + [0] * 3
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in one])[:21],
                                pool.labels)


def test_global_batches_are_sharded_and_prefetched(mocked):
  from bitune_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  data = input_lib.load(_config("flowers"), Needs(views="two"))
  local = [b for _, b in zip(range(3), data.train_batches(0))]
  ahead = [b for _, b in zip(range(3), input_lib.prefetch_to_device(
      data.train_batches(0), mesh))]
  for a, b in zip(local, ahead):
    assert isinstance(b["image_u8"], jax.Array)
    assert len(b["image_u8"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(b["image_u8"]), a["image_u8"])


def test_an_input_error_reaches_the_loop():
  """An error while the thread gathers a batch is raised where the batch is read."""
  def broken():
    yield {"label": np.zeros(8, np.int32)}
    raise OSError("disk gone")
  from bitune_jax import sharding  # pylint: disable=g-import-not-at-top
  batches = input_lib.prefetch_to_device(broken(), sharding.make_mesh(), size=1)
  next(batches)
  with pytest.raises(OSError, match="disk gone"):
    next(batches)


# --------------------------------------------------------------------------- replay
def test_source_replay_joins_the_pool_unlabelled(mocked):
  config = _config("pets", module=unsup_config, replay_source="cifar100")
  config.unsup.replay_fraction = 0.1
  data = input_lib.load(config, methods.data_needs(config))
  target = 4 * 37
  replay = round(0.1 * 4 * 100)  # 10% of the mock CIFAR-100 training split
  assert len(data.train) == target and len(data.pool) == target + replay
  assert data.pool_is_replay.sum() == replay
  assert (data.pool.labels == -1).sum() == replay
  labels = np.concatenate([b["label"] for _, b in zip(range(40), data.train_batches(0))])
  assert (labels == -1).mean() == pytest.approx(replay / (target + replay), abs=0.05)
  encoded, _ = mock_examples(100, "train")
  chosen = splits.replay_subset(400, fraction=0.1, seed=config.seed)
  rows = np.arange(target, target + replay)
  side = cache_side(config)  # the MoCo views' cache side
  assert data.pool.take(rows)["image_u8"].shape[1:] == (side, side, 3)
  expected = np.stack([np.asarray(Image.open(io.BytesIO(encoded[i])).convert("RGB").resize(
      (side, side), Image.BILINEAR)) for i in chosen])
  np.testing.assert_array_equal(data.pool.take(rows)["image_u8"], expected)


def test_a_second_run_maps_its_caches_without_reading_the_images(mocked, monkeypatch,
                                                                  tmp_path):
  """Second load of the same run (a k-shot subset, the test split, replay): the caches
  are memory-mapped and no image is read from tfds; the examples are the same. A cache
  of other rows (another seed) is built, reading its images."""
  config = _config("pets", module=unsup_config, replay_source="cifar100", kshot=2,
                   cache_dir=str(tmp_path))
  config.unsup.replay_fraction = 0.1
  reads = []
  read_encoded = datasets.read_encoded

  def counted(b, split, **kwargs):
    reads.append((b.name, split))
    return read_encoded(b, split, **kwargs)
  monkeypatch.setattr(datasets, "read_encoded", counted)
  first = input_lib.load(config, methods.data_needs(config))
  assert len(reads) == 3, reads  # the k-shot training subset, the test split, replay
  del reads[:]
  again = input_lib.load(config, methods.data_needs(config))
  assert reads == []
  for a, b in ((first.pool, again.pool), (first.test, again.test)):
    rows = np.arange(len(a))
    for field in ("image_u8", "hw", "label"):
      np.testing.assert_array_equal(a.take(rows)[field], b.take(rows)[field])
  config.seed += 1  # other k-shot rows and replay rows: built, the test split mapped
  input_lib.load(config, methods.data_needs(config))
  assert sorted(reads) == [("cifar100", "train"), ("oxford_iiit_pet", "train")], reads


# --------------------------------------------------------------------------- cli
@pytest.mark.slow
def test_aircraft_command_line_on_the_official_layout(tmp_path):
  """`bitune-train` on FGVC-Aircraft as tfds builds it from the official archive layout
  (a fake one), its metric the mean per-class accuracy. On resnet_small: the dataset's
  path is under test, not the network (ResNet-18 compiled twice as long: 61 -> 28 CPU s);
  test_multiprocess.py's tfds run trains the same program."""
  archive = fakes.make_fgvc_aircraft(str(tmp_path / "manual"), per_split=1)
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "bitune_jax.cli.train",
         "--config",
         os.path.join(ROOT, "configs", "finetune.py") + ":aircraft,resnet_small,100",
         "--workdir", str(workdir), f"--config.data.manual_dir={archive}",
         f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.total_steps=3",
         "--config.image_size=32", "--config.batch_size=16", "--config.eval_batch_size=64"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == 3 and summary["metric"] == "mean_class_acc"
  assert summary["score"] == summary["mean_class_acc"]
  printed = re.search(r"mean per-class accuracy ([0-9.]+)", result.stdout)
  assert printed, result.stdout[-2000:]
  assert float(printed[1]) == pytest.approx(summary["mean_class_acc"], abs=5e-5)


def test_unknown_replay_source_is_refused_before_anything_is_read(tmp_path):
  """By the `DataSpec` (which `loop.setup` makes before it compiles), before any
  dataset is opened."""
  config = _config("pets", module=unsup_config, replay_source="places365",
                   cache_dir=str(tmp_path))
  with pytest.raises(ValueError, match="unknown data.replay_source 'places365'"):
    input_lib.load(config, methods.data_needs(config))
  config.unsup.replay_fraction = 0.0  # no replay: no source needed
  assert data_spec(config, methods.data_needs(config)).needs.replay_fraction == 0


def test_manual_dataset_without_its_archive_is_a_clear_error(tmp_path):
  config = _config("aircraft", data_dir=str(tmp_path / "tfds"),
                   manual_dir=str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="manual_dir"):
    input_lib.load(config, methods.data_needs(config))


def test_no_network_fails_in_seconds_with_what_to_do(tmp_path, monkeypatch):
  """Preparing a tfds dataset with no network once spent minutes in download retries."""
  import socket  # pylint: disable=g-import-not-at-top
  from bitune_jax.data import datasets  # pylint: disable=g-import-not-at-top

  def no_network(address, *args, **kwargs):
    raise OSError(f"simulated: no route to {address[0]}")
  monkeypatch.setattr(socket, "create_connection", no_network)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda *a, **k: pytest.fail("tried to download"))
  with pytest.raises(ValueError, match=(
      rf"dataset 'dtd' \(tfds dtd\) is not prepared in {tmp_path}/tfds\S*, and its "
      r"download host www\.robots\.ox\.ac\.uk cannot be reached \(no network\?\)\. "
      r"Prepare it where there is a network with `tfds build dtd --data_dir DIR`")):
    datasets.builder("dtd", data_dir=str(tmp_path / "tfds"))
