"""Fake source datasets on disk, laid out like the real archives, for builder tests.

Every fake image is one flat colour (plus small noise) that encodes its class:
`class_colour(k)` gives the colour of class k and `colour_class(rgb)` reads it back from
the mean colour of a decoded image (or crop), so a test can check labels against pixels.

- `make_fgvc_aircraft`: `fgvc-aircraft-2013b/data/...` with 100 variants.
- `make_coco`: COCO 2017 instances (`annotations/`, `train2017/`, `val2017/`) built so
  that `coco70` must drop small, thin and crowd boxes and must break a tie by category
  id to pick its classes (`coco_expected_ids`).
"""

import contextlib
import json
import os

import numpy as np
from PIL import Image

_LEVELS = (20, 70, 120, 170, 220)  # 5 levels per channel: 125 colours, 50 apart.
_NOISE = 10  # Uniform pixel noise in [-10, 10]: the mean stays far within 25 of the level.
FGVC_SPLITS = ("train", "val", "test")
COCO_SIZE = (120, 160)  # (height, width) of every fake COCO image.


def class_colour(k):
  """RGB colour (3 ints) of class k, 0 <= k < 125."""
  if not 0 <= k < len(_LEVELS) ** 3:
    raise ValueError(f"class {k} has no colour; at most {len(_LEVELS) ** 3} classes")
  return (_LEVELS[k % 5], _LEVELS[k // 5 % 5], _LEVELS[k // 25])


def colour_class(rgb):
  """Class whose colour is nearest to `rgb` (e.g. the mean colour of a decoded image)."""
  digits = [int(np.argmin([abs(c - v) for v in _LEVELS])) for c in rgb]
  return digits[0] + 5 * digits[1] + 25 * digits[2]


def _write_jpeg(path, colour, size, rng):
  """Writes a (height, width) JPEG of a flat colour plus uniform noise."""
  noise = rng.integers(-_NOISE, _NOISE + 1, size=(*size, 3))
  pixels = np.clip(np.asarray(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
  Image.fromarray(pixels).save(path, format="JPEG", quality=95)


# ----------------------------------------------------------------------------- FGVC


def fgvc_variant_names():
  """The 100 fake variant names, in variants.txt order (one with a slash, some spaces)."""
  names = [f"Model-{k:03d}" for k in range(100)]
  names[0], names[1], names[2], names[3] = "707-320", "F/A-18", "Boeing 717", "DHC 8 / 300"
  return names


def make_fgvc_aircraft(root, *, per_split=1, size=(40, 56), seed=0):
  """Writes a fake `root/fgvc-aircraft-2013b/data/` and returns `root`.

  `per_split` images of each of the 100 variants in each of train/val/test, of
  `size` = (height, width), coloured `class_colour(variant index)`. Split files list
  their images in a shuffled order. Image ids are 7-digit strings, like the real ones.
  """
  rng = np.random.default_rng(seed)
  data = os.path.join(root, "fgvc-aircraft-2013b", "data")
  os.makedirs(os.path.join(data, "images"), exist_ok=True)
  names = fgvc_variant_names()
  with open(os.path.join(data, "variants.txt"), "w") as f:
    f.write("".join(f"{name}\n" for name in names))
  next_id = 1000000
  for split in FGVC_SPLITS:
    lines = []
    for k, name in enumerate(names):
      for _ in range(per_split):
        image_id = f"{next_id:07d}"
        next_id += 1
        _write_jpeg(os.path.join(data, "images", f"{image_id}.jpg"), class_colour(k),
                    size, rng)
        lines.append(f"{image_id} {name}\n")
    with open(os.path.join(data, f"images_variant_{split}.txt"), "w") as f:
      f.write("".join(lines[i] for i in rng.permutation(len(lines))))
  return root


# ----------------------------------------------------------------------------- COCO


def coco_category_ids(num_categories):
  """COCO-like category ids with gaps: index i -> i + 1 + i // 10 (1..10, 12..21, ...)."""
  return [i + 1 + i // 10 for i in range(num_categories)]


def _tie_indices(num_categories, num_classes=70):
  """Indices of the categories with fewer kept boxes: num_categories - 69 of them.

  They tie with each other, so exactly one (the smallest id) fills the 70th slot.
  Chosen as 10, 30, 50, ... first, so the losers are not simply the largest ids.
  """
  if num_categories <= num_classes:
    return []
  order = sorted(range(num_categories), key=lambda i: (i % 20 != 10, i))
  return sorted(order[:num_categories - num_classes + 1])


def coco_expected_ids(num_categories=72):
  """Category ids `coco70` must select from `make_coco(num_categories=...)`, by id."""
  ids = coco_category_ids(num_categories)
  losers = _tie_indices(num_categories)[1:]
  return [cid for i, cid in enumerate(ids) if i not in losers]


def _random_box(rng, height, width, *, w=None, h=None):
  """Integer box [x, y, w, h] inside the image; sizes default to multiples of 10."""
  w = int(rng.choice(np.arange(50, 101, 10))) if w is None else w
  h = int(rng.choice(np.arange(50, 101, 10))) if h is None else h
  return [int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h]


def _image_boxes(rng, tie, train):
  """[(bbox, iscrowd)] of one image: kept boxes, then boxes coco70 must drop."""
  height, width = COCO_SIZE
  kept = 1 if (tie or not train) else 2
  boxes = [(_random_box(rng, height, width), 0) for _ in range(kept)]
  boxes.append((_random_box(rng, height, width, w=int(rng.integers(8, 50))), 0))  # Narrow.
  boxes.append((_random_box(rng, height, width), 1))  # Crowd.
  if tie and train:  # More dropped boxes than winners have boxes: a bad filter picks these.
    boxes += [(_random_box(rng, height, width, h=int(rng.integers(8, 50))), 0)
              for _ in range(3)]
  return boxes


def _coco_split(root, folder, ids, ties, images_per_category, rng, first_image_id):
  """Writes one split's images; returns its (images, annotations) json lists."""
  os.makedirs(os.path.join(root, folder), exist_ok=True)
  images, annotations = [], []
  image_id = first_image_id
  for i, cid in enumerate(ids):
    for _ in range(images_per_category):
      file_name = f"{image_id:012d}.jpg"
      _write_jpeg(os.path.join(root, folder, file_name), class_colour(i), COCO_SIZE, rng)
      images.append({"id": image_id, "file_name": file_name,
                     "height": COCO_SIZE[0], "width": COCO_SIZE[1]})
      boxes = _image_boxes(rng, i in ties, train=folder == "train2017")
      for j, (bbox, crowd) in enumerate(boxes):
        annotations.append({"id": 10 * image_id + j, "image_id": image_id,
                            "category_id": cid, "bbox": bbox, "area": bbox[2] * bbox[3],
                            "iscrowd": crowd, "segmentation": []})
      image_id += 1
  return images, annotations


def make_coco(root, *, num_categories=72, images_per_category=2, seed=0):
  """Writes a fake COCO 2017 (`annotations/`, `train2017/`, `val2017/`); returns `root`.

  Category index i (id `coco_category_ids(n)[i]`, name `category-<id>`) owns
  `images_per_category` train images and 1 val image of 160x120 pixels, all coloured
  `class_colour(i)`, each annotated only with category i: kept boxes (integer, sides
  multiples of 10, at least 50), plus a narrow box (width < 50) and a crowd box that must
  be dropped. Train images have 2 kept boxes each, except for the `num_categories - 69`
  tie categories (1 kept box, 3 extra flat boxes of height < 50): the smallest-id one
  fills the 70th class, see `coco_expected_ids`. Val images have 1 kept box.
  """
  rng = np.random.default_rng(seed)
  ids = coco_category_ids(num_categories)
  ties = set(_tie_indices(num_categories))
  categories = [{"id": cid, "name": f"category-{cid:03d}", "supercategory": "thing"}
                for cid in ids]
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  first_ids = {"train2017": 1, "val2017": 100000}
  for folder, per_category in (("train2017", images_per_category), ("val2017", 1)):
    images, annotations = _coco_split(root, folder, ids, ties, per_category, rng,
                                      first_ids[folder])
    with open(os.path.join(root, "annotations", f"instances_{folder}.json"), "w") as f:
      json.dump({"images": images, "annotations": annotations,
                 "categories": categories}, f)
  return root


# --------------------------------------------------------------------------- tfds, configs
@contextlib.contextmanager
def mocked_tfds(monkeypatch, as_dataset_fn):
  """tfds's `mock_data` reading examples from `as_dataset_fn`. The mock downloads
  nothing, so there is no download host to reach first."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from bitune_jax.data import datasets  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(datasets, "_unreachable_host", lambda urls: None)
  with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn):
    yield


def tiny_config(method, arg="demo", **overrides):
  """The shipped `configs/<method>.py:<arg>` (`demo`, or `vit_demo`), made tiny for
  tests (no source model, 16 px, batch 16, 6 steps, eval/log/checkpoint every 3);
  `overrides` set top-level fields, or update a section when given a dict."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"bitune_jax.configs.{method}").get_config(arg)
  config.init_from, config.image_size = "", 16
  config.batch_size, config.eval_batch_size = 16, 64
  config.total_steps = 6
  config.log_every = config.eval_every = config.checkpoint_every = 3
  for key, value in overrides.items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  return config


@contextlib.contextmanager
def our_log(level="INFO"):
  """The records the `bitune_jax` logger emits inside the block, at `level` and up,
  heard by a handler of its own (whatever the console or pytest did to propagation)."""
  import logging  # pylint: disable=g-import-not-at-top
  records = []
  handler = logging.Handler(level)
  handler.emit = records.append
  logger = logging.getLogger("bitune_jax")
  old_level = logger.level
  logger.addHandler(handler)
  logger.setLevel(min(logging.getLevelName(level), logger.getEffectiveLevel()))
  try:
    yield records
  finally:
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def view_batches(run, start_step=0):
  """The run's host training batches from `start_step` on, each with the views its
  train step makes of it (`image_q`, `image_k` or `image`, float32, keys from (seed,
  step, row, view)) added: for tests that read the views or feed a method's step
  directly. The run's own step recomputes the same views from `image_u8`."""
  import jax  # pylint: disable=g-import-not-at-top
  views = jax.jit(run.data.views)
  for step, batch in enumerate(run.data.train_batches(start_step), start_step):
    yield dict(batch, **jax.device_get(views(batch, step)))


def write_safetensors(path, tensors):
  """A safetensors file written from its specification (little-endian u64 header
  length, JSON header of dtype / shape / data_offsets, the raw data) from numpy arrays
  (float32 or float16, kept as they are)."""
  codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
  header, blobs, offset = {}, [], 0
  for name, value in tensors.items():
    value = np.ascontiguousarray(value)
    data = value.tobytes()
    header[name] = {"dtype": codes[value.dtype], "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  text = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))
  return str(path)

