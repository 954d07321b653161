"""TFDS builder `coco70`: the Bi-tuning paper's COCO-70 object-crop classification set.

The paper: "We use annotations of COCO dataset to construct a large-scale classification
dataset, cropping object with padding for each image and removing minimal items (with
height and width less than 50 pixels), resulting a large-scale dataset containing 70
classes with more than 1000 images per category." It lists neither the 70 classes nor
the padding; our documented choices:

- Source: COCO 2017 instance annotations, read from a manual directory (see `LAYOUT`).
- Kept boxes: `iscrowd == 0` and bbox `[x, y, w, h]` with `w >= 50 and h >= 50`.
- Crop: the box padded by `PAD_FRACTION` (10%) of its width/height on each side,
  clipped to the image, rounded outwards to whole pixels (`padded_box`).
- Classes: the `NUM_CLASSES` (70) categories with the most kept crops in train2017
  (ties broken by the smaller category id), ordered by COCO category id, named by their
  COCO category names.
- Splits: `train` = crops of train2017, `test` = crops of val2017 (selected classes only).
- Features: `image` (crop, JPEG quality 95), `label`, `image/filename`
  (`<file_name>#<annotation id>`).

Source images are processed one at a time: opened once, all their kept boxes cropped.
"""

import collections
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from bitune_jax.data.builders import features

NAME = "coco70"
NUM_CLASSES = 70
MIN_SIZE = 50  # Boxes with width or height below this many pixels are dropped.
PAD_FRACTION = 0.1
JPEG_QUALITY = 95
SPLITS = {"train": "train2017", "test": "val2017"}
REQUIRED_FILES = (
    "annotations/instances_train2017.json", "annotations/instances_val2017.json",
    "train2017", "val2017")
_EPS = 1e-6  # Float noise allowed before rounding a padded edge outwards.

LAYOUT = f"""\
  <manual_dir>/annotations/instances_train2017.json
  <manual_dir>/annotations/instances_val2017.json
  <manual_dir>/train2017/<file_name>.jpg
  <manual_dir>/val2017/<file_name>.jpg
(or the same under <manual_dir>/{NAME}/)"""

INSTRUCTIONS = f"""\
Download train2017.zip, val2017.zip and annotations_trainval2017.zip from
https://cocodataset.org/#download and extract them into the manual directory, which
must then read:
{LAYOUT}"""


def resolve_manual_dir(manual_dir: epath.PathLike | None) -> epath.Path:
  """Returns the folder holding `annotations/`, `train2017/`, `val2017/`, or raises.

  Tries `<manual_dir>/coco70/` first, then `<manual_dir>` itself.
  """
  return features.manual_root(manual_dir, name=NAME, layout=LAYOUT,
                              marker="annotations", required=REQUIRED_FILES)


def read_annotations(
    path: epath.PathLike
) -> tuple[dict[int, str], dict[int, str],
           dict[int, list[tuple[int, int, tuple[float, float, float, float]]]]]:
  """Reads a COCO instances file, keeping only the boxes COCO-70 crops.

  Returns:
    categories: {category id: name}.
    file_names: {image id: file name}.
    boxes: {image id: [(annotation id, category id, (x, y, w, h))]}, kept boxes only.
  """
  with epath.Path(path).open("r") as f:
    coco = json.load(f)
  categories = {c["id"]: c["name"] for c in coco["categories"]}
  file_names = {im["id"]: im["file_name"] for im in coco["images"]}
  boxes = collections.defaultdict(list)
  for ann in coco["annotations"]:
    x, y, w, h = ann["bbox"]
    if ann.get("iscrowd", 0) == 0 and w >= MIN_SIZE and h >= MIN_SIZE:
      boxes[ann["image_id"]].append((ann["id"], ann["category_id"], (x, y, w, h)))
  return categories, file_names, dict(boxes)


def select_classes(boxes: Mapping[int, Sequence[tuple[int, int, Any]]],
                   categories: Mapping[int, str],
                   num_classes: int = NUM_CLASSES) -> list[int]:
  """Category ids of the `num_classes` most frequent kept boxes, sorted by id.

  Ties in the count go to the smaller category id. Raises ValueError when fewer than
  `num_classes` categories have a kept box.
  """
  counts = collections.Counter(cat for anns in boxes.values() for _, cat, _ in anns)
  if len(counts) < num_classes:
    raise ValueError(
        f"Dataset {NAME!r}: only {len(counts)} categories have boxes of at least "
        f"{MIN_SIZE}x{MIN_SIZE} pixels in train2017, {num_classes} are needed.")
  ranked = sorted(counts, key=lambda cat: (-counts[cat], cat))
  chosen = sorted(ranked[:num_classes])
  unknown = [cat for cat in chosen if cat not in categories]
  if unknown:
    raise ValueError(f"Dataset {NAME!r}: annotations use unknown category ids {unknown}")
  return chosen


def padded_box(bbox: Sequence[float], width: int, height: int,
               pad_fraction: float = PAD_FRACTION) -> tuple[int, int, int, int]:
  """Pixel crop box (left, top, right, bottom) of a COCO bbox padded and clipped.

  The box [x, y, w, h] grows by `pad_fraction * w` left and right and `pad_fraction * h`
  above and below, is clipped to [0, width] x [0, height], and is rounded outwards
  (floor of left/top, ceil of right/bottom).
  """
  x, y, w, h = bbox
  left = max(0.0, x - pad_fraction * w)
  top = max(0.0, y - pad_fraction * h)
  right = min(float(width), x + w + pad_fraction * w)
  bottom = min(float(height), y + h + pad_fraction * h)
  box = (math.floor(left + _EPS), math.floor(top + _EPS),
         math.ceil(right - _EPS), math.ceil(bottom - _EPS))
  if box[2] <= box[0] or box[3] <= box[1]:
    raise ValueError(f"box {bbox} lies outside its {width}x{height} image")
  return box


def _encode_jpeg(image):
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
  return buffer.getvalue()


class Coco70(tfds.core.GeneratorBasedBuilder):
  """COCO-70: padded crops of COCO 2017 objects, 70 classes (Bi-tuning paper)."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "COCO 2017 crops, 10% padding, boxes >= 50x50, top-70 classes."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  code_path = features.code_path(__file__)

  def _info(self):  # label names: the chosen COCO categories, set in `_split_generators`
    return features.info(self, NUM_CLASSES, homepage="https://cocodataset.org/")

  def _split_generators(self, dl_manager):
    root = resolve_manual_dir(dl_manager.manual_dir)
    sources = {split: read_annotations(root / "annotations" / f"instances_{folder}.json")
               for split, folder in SPLITS.items()}
    categories, _, train_boxes = sources["train"]
    chosen = select_classes(train_boxes, categories)
    self.info.features["label"].names = [categories[cat] for cat in chosen]
    labels = {cat: k for k, cat in enumerate(chosen)}
    return {split: self._generate_examples(root / SPLITS[split], file_names, boxes, labels)
            for split, (_, file_names, boxes) in sources.items()}

  def _generate_examples(self, image_dir, file_names, boxes, labels):
    for image_id in sorted(boxes):
      kept = [(ann_id, labels[cat], bbox) for ann_id, cat, bbox in boxes[image_id]
              if cat in labels]
      if not kept:
        continue
      file_name = file_names[image_id]
      path = image_dir / file_name
      if not path.exists():
        raise ValueError(f"Dataset {NAME!r}: image {path} is annotated but missing")
      with Image.open(path) as image:
        image = image.convert("RGB")
      for ann_id, label, bbox in kept:
        crop = image.crop(padded_box(bbox, image.width, image.height))
        yield str(ann_id), {
            "image": _encode_jpeg(crop),
            "label": label,
            "image/filename": f"{file_name}#{ann_id}",
        }
