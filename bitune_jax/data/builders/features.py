"""What both manual-directory builders share: the features stored per example, and
where the manual directory's data is."""

from collections.abc import Sequence

from etils import epath
import tensorflow_datasets as tfds


def classification_features(num_classes: int) -> tfds.features.FeaturesDict:
  """`image` (JPEG), `label` (class names set at generation time), `image/filename`."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=num_classes),
      "image/filename": tfds.features.Text(),
  })


def manual_root(manual_dir: epath.PathLike | None, *, name: str, layout: str,
                marker: str, required: Sequence[str]) -> epath.Path:
  """The folder holding `marker/` and every `required` file: `<manual_dir>/<name>/`
  first, then `<manual_dir>` itself; else a ValueError naming the expected `layout`."""
  def error(problem):
    return ValueError(
        f"Dataset {name!r}: {problem}.\nExpected layout:\n{layout}\n"
        "Point the manual directory at it with --config.data.manual_dir=<manual_dir>.")
  if not manual_dir:
    raise error("no manual directory was given")
  manual_dir = epath.Path(manual_dir).expanduser()
  if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
    raise error(f"manual directory {manual_dir} does not exist or is empty")
  for root in (manual_dir / name, manual_dir):
    if (root / marker).is_dir():
      missing = [f for f in required if not (root / f).exists()]
      if missing:
        raise error(f"missing {', '.join(str(root / f) for f in missing)}")
      return root
  raise error(f"no {marker}/ folder in {manual_dir} or {manual_dir / name}")


def code_path(module_file: str) -> epath.Path:
  """A builder's `code_path`: tfds 4.9.10 derives it through `importlib_resources`,
  which it does not install on Python >= 3.9 (tensorflow/datasets#11212); this is the
  value it would find."""
  return epath.Path(module_file)


def info(builder: tfds.core.GeneratorBasedBuilder, num_classes: int,
         homepage: str) -> tfds.core.DatasetInfo:
  """`_info` of a manual-directory classification builder (`classification_features`;
  the label names are set when the splits are generated)."""
  return builder.dataset_info_from_configs(
      features=classification_features(num_classes), supervised_keys=("image", "label"),
      homepage=homepage)
