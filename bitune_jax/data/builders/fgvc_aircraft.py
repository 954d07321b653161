"""TFDS builder `fgvc_aircraft`: FGVC-Aircraft 2013b at the variant level (100 classes).

Reads the official archive `fgvc-aircraft-2013b.tar.gz`, extracted as published, from a
manual directory (nothing is downloaded). The manual directory may hold the extracted
folder directly or under a `fgvc_aircraft/` subfolder (see `resolve_manual_dir`):

  <manual_dir>/fgvc-aircraft-2013b/data/variants.txt                 100 names, one a line
  <manual_dir>/fgvc-aircraft-2013b/data/images_variant_{train,val,test}.txt
  <manual_dir>/fgvc-aircraft-2013b/data/images/<image id>.jpg

A split file has lines `<image id> <variant name>`: the id is the first space-separated
token and the rest of the line is the name, which may itself contain spaces or slashes
(`F/A-18`). Class `k` is the k-th line of variants.txt.

Splits: `train` (3334), `validation` (3333), `test` (3333); the papers train on
`train+validation` (6667 images) and evaluate on `test`.

Images are kept exactly as published: the JPEG bytes are stored unchanged, and the
copyright banner at the bottom of each image is NOT cropped away.
"""

import os
from collections.abc import Sequence

import tensorflow_datasets as tfds
from etils import epath

from bitune_jax.data.builders import features

NAME = "fgvc_aircraft"
NUM_CLASSES = 100
ARCHIVE_DIR = "fgvc-aircraft-2013b"
SPLIT_FILES = {
    "train": "images_variant_train.txt",
    "validation": "images_variant_val.txt",
    "test": "images_variant_test.txt",
}
# Paths, relative to the folder that holds the extracted archive, that must exist.
REQUIRED_FILES = tuple(
    f"{ARCHIVE_DIR}/data/{f}" for f in ("variants.txt", *SPLIT_FILES.values())
) + (f"{ARCHIVE_DIR}/data/images",)

LAYOUT = f"""\
  <manual_dir>/{ARCHIVE_DIR}/data/variants.txt
  <manual_dir>/{ARCHIVE_DIR}/data/images_variant_train.txt (and _val.txt, _test.txt)
  <manual_dir>/{ARCHIVE_DIR}/data/images/<image id>.jpg
(or the same under <manual_dir>/{NAME}/)"""

INSTRUCTIONS = f"""\
Download fgvc-aircraft-2013b.tar.gz from
https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ and extract it into the manual
directory, which must then read:
{LAYOUT}"""


def resolve_manual_dir(manual_dir: epath.PathLike | None) -> epath.Path:
  """Returns the folder holding `fgvc-aircraft-2013b/`, or raises a clear ValueError.

  Tries `<manual_dir>/fgvc_aircraft/` first, then `<manual_dir>` itself.
  """
  return features.manual_root(manual_dir, name=NAME, layout=LAYOUT,
                              marker=ARCHIVE_DIR, required=REQUIRED_FILES)


def read_variants(path: epath.PathLike) -> list[str]:
  """Returns the variant names of variants.txt in file order; exactly 100, unique."""
  path = epath.Path(path)
  names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if len(names) != NUM_CLASSES:
    raise ValueError(f"{path}: expected {NUM_CLASSES} variant names, found {len(names)}")
  if len(set(names)) != len(names):
    raise ValueError(f"{path}: duplicate variant names")
  return names


def read_split(path: epath.PathLike, names: Sequence[str]) -> list[tuple[str, int]]:
  """Returns [(image id, label)] of a split file; an unknown variant raises ValueError."""
  path = epath.Path(path)
  index = {name: k for k, name in enumerate(names)}
  pairs = []
  for line_number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    image_id, _, variant = line.strip().partition(" ")
    variant = variant.strip()
    if variant not in index:
      raise ValueError(
          f"{path}:{line_number}: variant {variant!r} of image {image_id!r} "
          "is not in variants.txt")
    pairs.append((image_id, index[variant]))
  return pairs


class FgvcAircraft(tfds.core.GeneratorBasedBuilder):
  """FGVC-Aircraft 2013b, variant level (100 classes), images as published."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Variant level, train/validation/test as published."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  code_path = features.code_path(__file__)

  def _info(self):  # label names: the names of variants.txt, set in `_split_generators`
    return features.info(self, NUM_CLASSES, homepage="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/")

  def _split_generators(self, dl_manager):
    data = resolve_manual_dir(dl_manager.manual_dir) / ARCHIVE_DIR / "data"
    names = read_variants(data / "variants.txt")
    self.info.features["label"].names = names
    splits = {}
    for split, filename in SPLIT_FILES.items():
      pairs = read_split(data / filename, names)
      missing = [i for i, _ in pairs if not (data / "images" / f"{i}.jpg").exists()]
      if missing:
        raise ValueError(
            f"{data / filename}: {len(missing)} images missing from {data / 'images'}, "
            f"e.g. {missing[0]}.jpg")
      splits[split] = self._generate_examples(data / "images", pairs)
    return splits

  def _generate_examples(self, image_dir, pairs):
    for image_id, label in pairs:
      filename = f"{image_id}.jpg"
      yield image_id, {
          "image": os.fspath(image_dir / filename),  # Stored as is, not re-encoded.
          "label": label,
          "image/filename": filename,
      }
