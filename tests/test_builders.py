"""Tests of the `fgvc_aircraft` and `coco70` TFDS builders on the fake archives of fakes.py."""

import io
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import constants as tfds_constants

import fakes
from bitune_jax.data import builders
from bitune_jax.data.builders import coco70

FLAG = "--config.data.manual_dir="


def _examples(builder, split, **kwargs):
  """All examples of a split as numpy dicts, in file order."""
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False, **kwargs)))


def _class_of(image):
  return fakes.colour_class(np.asarray(image).reshape(-1, 3).mean(axis=0))


# ----------------------------------------------------------------------------- FGVC


@pytest.fixture(scope="module")
def fgvc_manual(tmp_path_factory):
  return fakes.make_fgvc_aircraft(str(tmp_path_factory.mktemp("fgvc_manual")))


@pytest.fixture(scope="module")
def fgvc(fgvc_manual, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("fgvc_data")
  return builders.prepare("fgvc_aircraft", data_dir=data_dir, manual_dir=fgvc_manual)


def _fgvc_data(manual):
  return os.path.join(manual, "fgvc-aircraft-2013b", "data")


def test_fgvc_splits_and_class_names(fgvc, fgvc_manual):
  assert {s: fgvc.info.splits[s].num_examples for s in ("train", "validation", "test")} == {
      "train": 100, "validation": 100, "test": 100}
  with open(os.path.join(_fgvc_data(fgvc_manual), "variants.txt")) as f:
    variants = [line.rstrip("\n") for line in f]
  assert fgvc.info.features["label"].names == variants == fakes.fgvc_variant_names()
  assert "F/A-18" in variants and "Boeing 717" in variants
  # The names persist in the prepared dataset_info, and the name is registered with tfds.
  reloaded = tfds.builder("fgvc_aircraft", data_dir=fgvc.data_dir_root)
  assert reloaded.info.features["label"].names == variants
  assert reloaded.info.splits["train+validation"].num_examples == 200


@pytest.mark.parametrize("split,split_file", [
    ("train", "images_variant_train.txt"), ("validation", "images_variant_val.txt"),
    ("test", "images_variant_test.txt")])
def test_fgvc_labels_match_images_and_split_files(fgvc, fgvc_manual, split, split_file):
  data = _fgvc_data(fgvc_manual)
  with open(os.path.join(data, split_file)) as f:
    variant_of = dict(line.rstrip("\n").split(" ", 1) for line in f)
  names = fgvc.info.features["label"].names
  examples = _examples(fgvc, split)
  assert len(examples) == len(variant_of)
  for ex in examples:
    image_id = ex["image/filename"].decode().removesuffix(".jpg")
    assert names[ex["label"]] == variant_of[image_id]
    assert _class_of(ex["image"]) == ex["label"]


def test_fgvc_images_stored_unchanged(fgvc, fgvc_manual):
  raw = _examples(fgvc, "test", decoders={"image": tfds.decode.SkipDecoding()})
  for ex in raw[:20]:
    path = os.path.join(_fgvc_data(fgvc_manual), "images", ex["image/filename"].decode())
    with open(path, "rb") as f:
      assert ex["image"] == f.read()


def test_fgvc_nested_layout_default_data_dir_and_reuse(tmp_path, monkeypatch):
  manual = tmp_path / "manual"
  fakes.make_fgvc_aircraft(str(manual / "fgvc_aircraft"), size=(8, 8))
  # tfds reads $TFDS_DATA_DIR once, at import, into `constants.DATA_DIR`.
  monkeypatch.setattr(tfds_constants, "DATA_DIR", str(tmp_path / "default"))
  builder = builders.prepare("fgvc_aircraft", data_dir=None, manual_dir=str(manual))
  assert builder.info.splits["test"].num_examples == 100
  assert (tmp_path / "default" / "fgvc_aircraft" / "1.0.0" / "label.labels.txt").exists()
  # Prepared already: no manual dir needed.
  again = builders.prepare("fgvc_aircraft", data_dir=tmp_path / "default", manual_dir=None)
  assert again.info.features["label"].names == fakes.fgvc_variant_names()


@pytest.fixture
def fgvc_copy(fgvc_manual, tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(fgvc_manual, manual)
  return manual


def _assert_clear(error, *words):
  """The error names the dataset, the expected layout and the flag to set."""
  for word in words:
    assert word in str(error.value), str(error.value)


@pytest.mark.parametrize("kind", ["missing", "empty", "none", "wrong_folder"])
def test_fgvc_missing_manual_dir(tmp_path, kind):
  manual = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "none": None,
            "wrong_folder": tmp_path / "wrong"}[kind]
  (tmp_path / "empty").mkdir()
  (tmp_path / "wrong" / "something").mkdir(parents=True)
  with pytest.raises(ValueError, match="fgvc_aircraft") as error:
    builders.prepare("fgvc_aircraft", data_dir=tmp_path / "data", manual_dir=manual)
  _assert_clear(error, "fgvc_aircraft", FLAG, "fgvc-aircraft-2013b/data/variants.txt")


def test_fgvc_missing_split_file(fgvc_copy, tmp_path):
  os.remove(os.path.join(_fgvc_data(fgvc_copy), "images_variant_val.txt"))
  with pytest.raises(ValueError, match="images_variant_val.txt") as error:
    builders.prepare("fgvc_aircraft", data_dir=tmp_path / "data", manual_dir=fgvc_copy)
  _assert_clear(error, "fgvc_aircraft", FLAG)


def test_fgvc_unknown_variant(fgvc_copy, tmp_path):
  with open(os.path.join(_fgvc_data(fgvc_copy), "images_variant_test.txt"), "a") as f:
    f.write("1000000 Concorde 2000\n")
  with pytest.raises(ValueError, match="'Concorde 2000'.*not in variants.txt"):
    builders.prepare("fgvc_aircraft", data_dir=tmp_path / "data", manual_dir=fgvc_copy)
  assert not builders.BUILDERS["fgvc_aircraft"](data_dir=tmp_path / "data").is_prepared()


def test_fgvc_wrong_number_of_variants(fgvc_copy, tmp_path):
  with open(os.path.join(_fgvc_data(fgvc_copy), "variants.txt"), "a") as f:
    f.write("Extra\n")
  with pytest.raises(ValueError, match="expected 100 variant names, found 101"):
    builders.prepare("fgvc_aircraft", data_dir=tmp_path / "data", manual_dir=fgvc_copy)


def test_unknown_dataset(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'cub'"):
    builders.prepare("cub", data_dir=tmp_path, manual_dir=tmp_path)


# ----------------------------------------------------------------------------- COCO-70

# make_coco(num_categories=72): ids 1..10, 12..21, ...; indices 30 and 50 (ids 34, 56)
# tie with index 10 (id 11) for the 70th slot and lose it to the smaller id.
EXPECTED_IDS = [cid for cid in fakes.coco_category_ids(72) if cid not in (34, 56)]


@pytest.fixture(scope="module")
def coco_manual(tmp_path_factory):
  return fakes.make_coco(str(tmp_path_factory.mktemp("coco_manual")))


@pytest.fixture(scope="module")
def coco(coco_manual, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("coco_data")
  return builders.prepare("coco70", data_dir=data_dir, manual_dir=coco_manual)


def _annotations(manual, folder):
  with open(os.path.join(manual, "annotations", f"instances_{folder}.json")) as f:
    return json.load(f)


def _kept_ids(coco_json, class_ids):
  return {a["id"] for a in coco_json["annotations"]
          if not a["iscrowd"] and a["bbox"][2] >= 50 and a["bbox"][3] >= 50
          and a["category_id"] in class_ids}


def test_coco_classes(coco):
  assert len(EXPECTED_IDS) == coco70.NUM_CLASSES == 70
  assert fakes.coco_expected_ids(72) == EXPECTED_IDS
  assert coco.info.features["label"].names == [f"category-{cid:03d}" for cid in EXPECTED_IDS]
  reloaded = tfds.builder("coco70", data_dir=coco.data_dir_root)
  assert reloaded.info.features["label"].names == coco.info.features["label"].names


def test_padded_box_by_hand():
  assert coco70.padded_box([10, 20, 50, 60], 160, 120) == (5, 14, 65, 86)
  assert coco70.padded_box([0, 0, 100, 100], 160, 120) == (0, 0, 110, 110)
  assert coco70.padded_box([100, 60, 60, 50], 160, 120) == (94, 55, 160, 115)
  assert coco70.padded_box([10.5, 20.2, 50.3, 60.1], 160, 120) == (5, 14, 66, 87)


@pytest.mark.parametrize("split,folder", [("train", "train2017"), ("test", "val2017")])
def test_coco_crops(coco, coco_manual, split, folder):
  coco_json = _annotations(coco_manual, folder)
  anns = {a["id"]: a for a in coco_json["annotations"]}
  kept = _kept_ids(coco_json, set(EXPECTED_IDS))
  assert len(kept) == {"train": 69 * 2 * 2 + 1 * 2 * 1, "test": 70}[split]
  examples = _examples(coco, split)
  assert len(examples) == coco.info.splits[split].num_examples == len(kept)
  index_of = {cid: i for i, cid in enumerate(fakes.coco_category_ids(72))}
  seen = set()
  for ex in examples:
    file_name, ann_id = ex["image/filename"].decode().split("#")
    ann = anns[int(ann_id)]
    seen.add(ann["id"])
    assert ann["image_id"] == int(file_name.removesuffix(".jpg"))
    assert ex["label"] == EXPECTED_IDS.index(ann["category_id"])
    assert _class_of(ex["image"]) == index_of[ann["category_id"]]
    # Integer boxes with sides multiple of 10: the 10% padding is exact.
    x, y, w, h = ann["bbox"]
    left, top = max(0, x - w // 10), max(0, y - h // 10)
    right, bottom = min(160, x + w + w // 10), min(120, y + h + h // 10)
    assert ex["image"].shape == (bottom - top, right - left, 3)
    source = np.asarray(Image.open(os.path.join(coco_manual, folder, file_name)), np.float32)
    diff = np.abs(source[top:bottom, left:right] - ex["image"]).mean()
    assert diff < 3.5, (ann, diff)  # That region: about 2, shifted by 1 pixel above 5.
  assert seen == kept  # Dropped (small, crowd, unselected class) boxes are absent.


def test_coco_nested_layout_exactly_70_categories(tmp_path):
  manual = tmp_path / "manual"
  fakes.make_coco(str(manual / "coco70"), num_categories=70, images_per_category=1)
  builder = builders.prepare("coco70", data_dir=tmp_path / "data", manual_dir=manual)
  assert builder.info.splits["train"].num_examples == 70 * 2
  assert builder.info.splits["test"].num_examples == 70
  assert builder.info.features["label"].names == [
      f"category-{cid:03d}" for cid in fakes.coco_category_ids(70)]


def test_coco_too_few_categories(tmp_path):
  manual = fakes.make_coco(str(tmp_path / "manual"), num_categories=69, images_per_category=1)
  with pytest.raises(ValueError, match="only 69 categories"):
    builders.prepare("coco70", data_dir=tmp_path / "data", manual_dir=manual)


def test_coco_missing_files(tmp_path):
  with pytest.raises(ValueError, match="instances_train2017.json") as error:
    builders.prepare("coco70", data_dir=tmp_path / "data", manual_dir=tmp_path / "nope")
  _assert_clear(error, "coco70", FLAG, "annotations/instances_train2017.json")
  (tmp_path / "manual" / "annotations").mkdir(parents=True)
  (tmp_path / "manual" / "annotations" / "instances_train2017.json").write_text("{}")
  with pytest.raises(ValueError, match="instances_val2017.json") as error:
    builders.prepare("coco70", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
  _assert_clear(error, "coco70", FLAG, "val2017")


def test_coco_encoding_is_jpeg(coco):
  raw = _examples(coco, "test", decoders={"image": tfds.decode.SkipDecoding()})
  with Image.open(io.BytesIO(raw[0]["image"])) as image:
    assert image.format == "JPEG"
