"""TFDS builders read from a manual directory: `fgvc_aircraft` and `coco70`.

Importing this package registers both builders with tfds, so `tfds.builder("coco70")`
works afterwards. `prepare` builds one into a data dir, once:

  builder = prepare("fgvc_aircraft", data_dir="~/tensorflow_datasets",
                    manual_dir="~/downloads/manual")
  train = builder.as_dataset(split="train+validation")

The manual directory may hold the extracted source directly or under a subfolder named
after the dataset (`<manual_dir>/fgvc_aircraft/fgvc-aircraft-2013b/...`). tfds 4.9.10
passes `DownloadConfig(manual_dir=...)` to `dl_manager.manual_dir` unchanged (it does not
append the dataset name), so the builders resolve both layouts themselves
(`resolve_manual_dir`), and `prepare` does so before generating anything.
"""

import logging
import os

import tensorflow_datasets as tfds

from etils import epath

from bitune_jax.data.builders import coco70
from bitune_jax.data.builders import fgvc_aircraft

_MODULES = {fgvc_aircraft.NAME: fgvc_aircraft, coco70.NAME: coco70}
BUILDERS = {fgvc_aircraft.NAME: fgvc_aircraft.FgvcAircraft, coco70.NAME: coco70.Coco70}


def prepare(name: str, *, data_dir: epath.PathLike | None,
            manual_dir: epath.PathLike | None) -> tfds.core.DatasetBuilder:
  """Returns the `tfds.core.DatasetBuilder` of `name` in `data_dir`, prepared.

  `data_dir` None or "" means the tfds default ($TFDS_DATA_DIR as it was when tfds was
  imported, else ~/tensorflow_datasets). The dataset is generated from `manual_dir`
  only if `data_dir` does not hold it yet (otherwise `manual_dir` may be None). Raises
  ValueError for an unknown `name`, or when the dataset must be generated and
  `manual_dir` is missing, empty or lacks expected files.
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; builders here: {sorted(BUILDERS)}")
  data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None
  builder = BUILDERS[name](data_dir=data_dir)
  if builder.is_prepared():
    return builder
  root = _MODULES[name].resolve_manual_dir(manual_dir)
  logging.getLogger("bitune_jax").info("preparing tfds %s in %s from %s", name,
                                       builder.data_dir, root)
  config = tfds.download.DownloadConfig(manual_dir=root, try_download_gcs=False)
  builder.download_and_prepare(download_config=config)
  return builder
