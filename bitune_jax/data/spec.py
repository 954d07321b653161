"""What a run reads, fixed once: the method's `Needs` and the run's `DataSpec`.

A method says what it asks of the data (`Needs`: which views, whether each batch also
holds unlabelled images, which share of the pool is replayed from a source dataset);
`data_spec` joins that to the config's data settings. The rest of `bitune_jax.data`
reads only the `DataSpec`: it knows no method and no ConfigDict.
"""

import dataclasses
import os

import ml_collections

from bitune_jax.data import datasets
from bitune_jax.data.views.augment import moco_side
from bitune_jax.data.views.batch import ViewSpec
from bitune_jax.data.views.crop import eval_resize

VIEWS = ("one", "two", "weak_strong")


@dataclasses.dataclass(frozen=True)
class Needs:
  """What a method asks of the data."""
  # "one": `image`; "two": `image_q` and `image_k`; "weak_strong": a weak view of the
  # labelled images, a weak and a strong view of the unlabelled ones.
  views: str = "one"
  # Each batch also holds `unlabelled` times as many images drawn from every training
  # image of the target, labels hidden (0: none).
  unlabelled: int = 0
  # The share of the pool replayed from `data.replay_source`, unlabelled (0: none).
  replay_fraction: float = 0.0

  def __post_init__(self):
    if self.views not in VIEWS:
      raise ValueError(f"views must be one of {', '.join(VIEWS)}, got {self.views!r}")
    if self.views == "weak_strong" and self.unlabelled < 1:
      raise ValueError("weak and strong views need unlabelled images (unlabelled >= 1)")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A run's data, whole: which examples, how they are cached, batched and viewed."""
  dataset: str  # "digits" or a name of `datasets.SPECS`
  needs: Needs
  image_size: int  # the views' side
  seed: int
  batch_size: int  # global, labelled images
  sampling_rate: float = 100.0  # percent of each class of the training split
  kshot: int = 0  # k images of every class (the rate ignored); 0: the rate
  val_fraction: float = 0.0  # held out of the training subset, to choose a checkpoint
  part: str = "target"  # digits only: "source" or "target"
  data_dir: str = ""
  manual_dir: str = ""
  replay_source: str = "imagenet"
  replay_manual_dir: str = ""
  cache_side: int = 0  # S of the caches (`data_spec` resolves it)
  cache_dir: str = ""  # "": in memory only
  threads: int = 0  # decoding threads; 0: the CPUs this process may use
  views: str = "reference"  # "reference" or "moco" (Needs.views "one" and "two")
  crop_scale: tuple[float, ...] = ()  # (): the kind's default
  flip: bool = True
  jitter: tuple[float, float, float, float] | None = None  # reference views only

  @property
  def view_spec(self) -> ViewSpec:
    if self.needs.views == "weak_strong":
      return ViewSpec(kind="weak_strong", size=self.image_size, seed=self.seed,
                      two_views=False)
    return ViewSpec(kind=self.views, size=self.image_size, seed=self.seed,
                    two_views=self.needs.views == "two",
                    scale=tuple(self.crop_scale) or None, flip=self.flip,
                    jitter=self.jitter)


def data_spec(config: ml_collections.ConfigDict, needs: Needs) -> DataSpec:
  """The `DataSpec` of `config` for a method that needs `needs`. A replay source that
  is not a known dataset is refused here, before anything is read or compiled."""
  data = config.data
  if data.views not in ("reference", "moco"):
    raise ValueError(f"data.views must be one of reference, moco, got {data.views!r}")
  if (needs.replay_fraction > 0 and config.dataset != "digits"
      and data.replay_source not in datasets.SPECS):
    raise ValueError(f"unknown data.replay_source {data.replay_source!r}; expected one "
                     f"of {', '.join(datasets.SPECS)}")
  jitter = (tuple(data.jitter) if data.color_jitter and data.views == "reference"
            else None)
  return DataSpec(
      dataset=config.dataset, needs=needs, image_size=int(config.image_size),
      seed=int(config.seed), batch_size=int(config.batch_size),
      sampling_rate=float(config.sampling_rate), kshot=int(data.kshot),
      val_fraction=float(data.val_fraction),
      part=data.get("part", "target"),  # the demo's source pre-training sets "source"
      data_dir=data.data_dir, manual_dir=data.manual_dir,
      replay_source=data.replay_source, replay_manual_dir=data.replay_manual_dir,
      cache_side=cache_side(config), cache_dir=cache_directory(config),
      threads=int(data.threads), views=data.views, crop_scale=tuple(data.crop_scale),
      flip=bool(data.flip), jitter=jitter)


def cache_side(config: ml_collections.ConfigDict) -> int:
  """S of the run's caches: `data.cache_side`, else the MoCo view's side
  (`augment.moco_side`) for MoCo views, else the reference's pre-resize for
  `config.image_size` (256 for 224)."""
  if config.data.cache_side:
    return int(config.data.cache_side)
  if config.data.views == "moco":
    return int(moco_side(config.image_size))
  return eval_resize(config.image_size)


def cache_directory(config: ml_collections.ConfigDict) -> str:
  """Where the caches live: `data.cache_dir` ('none': in memory only), else
  `$BITUNE_JAX_CACHE_DIR`, else `DATA_DIR/bitune_jax_cache` for a local data dir, else
  `~/.cache/bitune_jax`."""
  directory = config.data.cache_dir or os.environ.get("BITUNE_JAX_CACHE_DIR", "")
  if directory == "none":
    return ""
  if not directory and config.data.data_dir and "://" not in config.data.data_dir:
    directory = os.path.join(config.data.data_dir, "bitune_jax_cache")
  directory = directory or os.path.join(os.path.expanduser("~"), ".cache", "bitune_jax")
  if "://" in directory:
    raise ValueError(f"data.cache_dir {directory} must be a local folder (the caches "
                     "are memory-mapped)")
  os.makedirs(directory, exist_ok=True)
  return directory
