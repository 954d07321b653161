"""Shared defaults of `configs/*.py`: `get_config(arg)` with arg `demo`, `vit_demo` or
`dataset,arch,rate` (e.g. `cub,resnet50,25`, `cub,vit_b16,25`). Defaults follow the
reference implementation (SGD nesterov 0.9, weight decay 5e-4, lr 0.01 with the backbone
and projector at 0.1x, batch 48, step decay x0.1); a ViT arch takes the ViT fine-tuning
recipe instead (`_vit_recipe`: AdamW, layer-wise decay, warmup + cosine, drop-path)."""

import copy
import math
import os

import ml_collections

from bitune_jax import methods, models
from bitune_jax.methods import base
from bitune_jax.models import resnet, vit
from bitune_jax.data import datasets

# name: number of classes: the embedded demo and the papers' benchmarks
# (`bitune_jax.data.datasets.SPECS`; ImageNet is a replay source only).
DATASETS = {"digits": 5, **{name: s.num_classes for name, s in datasets.SPECS.items()
                            if name != "imagenet"}}
SAMPLING_RATES = (15, 25, 30, 50, 75, 100)


def queue_size_for_rate(rate):
  """The Bi-tuning paper sets K = 8, 16, 24, 32 by dataset scale (its 25/50/75/100%
  sampling rates); in between, the next multiple of 8."""
  return max(8, min(32, 8 * math.ceil(float(rate) / 25)))


def parse_arg(arg):
  """`'cub,resnet50,25'` -> ('cub', 'resnet50', 25.0) with clear errors."""
  parts = arg.split(",")
  if len(parts) != 3:
    raise ValueError(f"config argument must be 'demo', 'vit_demo' or 'dataset,arch,rate' "
                     f"(e.g. 'cub,resnet50,25'), got {arg!r}")
  dataset, arch, rate = parts
  try:
    rate = float(rate)
  except ValueError:
    raise ValueError(f"sampling rate must be a number in (0, 100], got {rate!r}") from None
  return dataset, arch, rate


def sections() -> dict:
  """`{method: its sections}`: the fields only that method reads, built by its
  `configs/<method>.py` (`Method.sections`; a config has these and no other method's).
  Every config also has the shared fields, `data` and `lr_mult`, and the demo's
  `pretrain` (its source model's pre-training)."""
  return {name: m.sections for name, m in methods.METHODS.items()}


def method_sections() -> frozenset:
  """Every section of a method (`sections`)."""
  return frozenset(s for own in sections().values() for s in own)


def foreign_field(method, field):
  """Why the dotted `field` is not in a config of `method`: the message that names the
  methods whose section it is in; None for a shared field or one of the method's own."""
  section = field.split(".")[0]
  if section not in method_sections() or section in sections().get(method, ()):
    return None
  return (f"config field {field!r} belongs to {_owners(section)}; this config is "
          f"{method}'s, which has no {section!r} section")


def _owners(section):
  return ", ".join(f"{m} (configs/{m}.py)" for m, own in sections().items()
                   if section in own)


# Fields added after runs were recorded without them: the value that describes how
# those runs trained (a resumed one then says so, e.g. --config.head_init=lecun); each
# method's own are its `Method.legacy`.
LEGACY = {"head_init": "lecun", "bf16": False, "profile_steps": 0, "multi_host": False,
          "data.val_fraction": 0.0, "data.kshot": 0, "data.threads": 0,
          "data.crop_scale": (), "data.flip": True, "data.color_jitter": False,
          "data.cache_dir": "", "data.cache_side": 0, "data.replay_manual_dir": "",
          "optimizer": "sgd", "warmup_fraction": 0.0, "drop_path": 0.0,
          "lr_mult.layer_decay": 1.0}


def stored(tree):
  """A recorded config (the dict of a run's `config.json`) in today's shape: moved
  fields (`Method.moved`) in their new place, the sections its method does not read
  dropped (a config recorded before each config had only its method's sections
  carries every method's; their values never counted), and the fields added since
  (`LEGACY`, `Method.legacy`) with the values it trained with."""
  tree = copy.deepcopy(dict(tree))
  moved = {f: old for m in methods.METHODS.values() for f, old in m.moved.items()}
  for field, old in moved.items():
    (section, name), (old_section, old_name) = field.split("."), old.split(".")
    if (section in tree and name not in tree[section]
        and old_name in tree.get(old_section, {})):
      tree[section][name] = tree[old_section][old_name]
  own = sections().get(tree.get("method"), ())
  tree = {k: v for k, v in tree.items() if k not in method_sections() or k in own}
  method = methods.METHODS.get(tree.get("method"))
  for field, value in dict(LEGACY, **(method.legacy if method else {})).items():
    section, _, name = field.rpartition(".")
    holder = tree.get(section) if section else tree
    if isinstance(holder, dict):
      holder.setdefault(name, value)
  return tree


def base_config(arg, method):
  """The fields every method's config has (`sections`: its own are added by its
  `configs/<method>.py`)."""
  config = ml_collections.ConfigDict()
  config.method = method
  if arg in DEMOS:
    dataset, arch, rate = "digits", DEMOS[arg], 25.0
  else:
    dataset, arch, rate = parse_arg(arg)
  config.dataset = dataset
  config.arch = arch
  config.sampling_rate = rate
  config.num_classes = DATASETS.get(dataset, -1)
  config.image_size = 32 if dataset == "digits" else 224
  config.seed = 0

  config.batch_size = 48
  config.eval_batch_size = 64
  config.total_steps = 10_000
  config.lr = 0.01
  config.lr_mult = ml_collections.ConfigDict(
      {"backbone": 0.1, "head": 1.0, "projector": 0.1, "source_head": 0.1})
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 5e-4
  config.schedule = "step"
  config.decay_at = (0.6, 0.9)
  config.decay_factor = 0.1
  # 'sgd' or 'adamw' (methods/optimizer.py); the ViT recipe's fields: a linear warmup
  # over warmup_fraction of the steps before a cosine schedule, drop-path at the last
  # block, and lr_mult.layer_decay (the backbone's block i of L at layer_decay^(L - i)).
  config.optimizer = "sgd"
  config.warmup_fraction = 0.0
  config.drop_path = 0.0
  config.lr_mult.layer_decay = 1.0

  # a bitune-convert output (.npz), 'demo:digits_source', or 'none' (random weights,
  # on purpose: no warning)
  config.init_from = ""
  # The new classifier's initialisation: '' is the method's reference one (Bi-tuning:
  # N(0, 0.01) weights and zero bias; every other method: PyTorch's nn.Linear
  # default), or 'torch', 'normal_0.01', 'lecun' (Flax's default). Projectors start as
  # PyTorch's nn.Linear.
  config.head_init = ""
  config.bf16 = False
  config.shard_queues = True
  config.multi_host = False
  config.log_every = 50
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.profile_steps = 0  # > 0: a jax.profiler trace of that many steps in the workdir
  # kshot > 0: k labelled images per class of the whole training split (k-shot
  # transfer), sampling_rate ignored; more than a class has is an error.
  # views: 'reference' (resize, random resized crop, flip[, colour jitter]) or 'moco'.
  # crop_scale: the area range of the random crop; () is the views' default
  # ((0.08, 1) reference, (0.2, 1) moco). flip: random horizontal flips.
  # cache_dir: where the decoded uint8 caches live ('' : $BITUNE_JAX_CACHE_DIR, else
  # DATA_DIR/bitune_jax_cache, else ~/.cache/bitune_jax; 'none': in memory only).
  # cache_side: S of the cache (0: 256 / 224 of image_size; the MoCo views' own rule).
  # threads: threads that build a cache (0: one per core).
  # replay_source: the dataset replayed by unsupervised fine-tuning (tfds datasets).
  # val_fraction > 0: that stratified fraction of the training images is held out, and
  # the best checkpoint is chosen on it (else on the test split, which flatters it).
  config.data = ml_collections.ConfigDict(dict(
      data_dir="", manual_dir="", kshot=0, views="reference", color_jitter=False,
      jitter=(0.4, 0.4, 0.4, 0.1), replay_source="imagenet", replay_manual_dir="",
      threads=0, val_fraction=0.0, crop_scale=(), flip=True, cache_dir="",
      cache_side=0))
  if arg in DEMOS:
    _demo(config)
  if models.is_vit(arch):
    _vit_recipe(config)
  return config


# `get_config` arguments of the offline digits demo: its backbone.
DEMOS = {"demo": "resnet_small", "vit_demo": "vit_demo"}


def _vit_recipe(config):
  """The ViT fine-tuning recipe (DeiT, MAE, BEiT): AdamW, weight decay 0.05, layer-wise
  decay 0.65 (MAE's for ViT-B; 0.75 for ViT-L), drop-path 0.1, a cosine schedule after
  5% warmup, the head and projector at the full rate; MAE's base rate 5e-4 per 256
  images scaled to the batch (9.4e-5 at 48)."""
  config.optimizer = "adamw"
  config.weight_decay = 0.05
  config.schedule = "cosine"
  config.warmup_fraction = 0.05
  config.drop_path = 0.1
  config.lr = 5e-4 * config.batch_size / 256
  config.lr_mult = ml_collections.ConfigDict(
      {"backbone": 1.0, "head": 1.0, "projector": 1.0, "source_head": 1.0,
       "layer_decay": 0.75 if vit.VARIANTS[config.arch]["depth"] > 12 else 0.65})
  if config.dataset == "digits":  # the demo's ViT: 4 blocks, trained from scratch
    config.lr, config.drop_path = 1e-3, 0.0
    config.lr_mult.layer_decay = 0.75
    config.pretrain.lr = 1e-3


def _demo(config):
  """Offline transfer on scikit-learn's digits: pre-train on 0-4, fine-tune on 5-9."""
  config.batch_size = 32
  config.eval_batch_size = 128
  config.total_steps = 300
  config.lr = 0.05
  config.decay_at = (0.7,)
  config.log_every = 25
  config.eval_every = 100
  config.checkpoint_every = 100
  config.init_from = "demo:digits_source"
  config.pretrain = ml_collections.ConfigDict(dict(total_steps=400, lr=0.1))
  config.data.crop_scale = (0.5, 1.0)  # a digit keeps its shape: crops of half or more,
  config.data.flip = False  # and no mirror images


# The config's paths (a local path or gs://...). `~` and `$VAR` in them are expanded by
# `finalize`: the shell leaves `--config.data.data_dir=~/x` as it is (`~` after `=`).
PATH_FIELDS = ("init_from", "data.data_dir", "data.manual_dir", "data.cache_dir",
               "data.replay_manual_dir", "cotuning.relationship_file")


def expand_path(path: str) -> str:
  """`~`, `~user` and `$VAR` / `${VAR}` expanded; '' and URLs (gs://...) as they are."""
  if not path or "://" in path:
    return path
  return os.path.expanduser(os.path.expandvars(path))


def finalize(config):
  """The config as a run uses it: its paths expanded (`PATH_FIELDS`), then validated.
  Called once where a run starts (and again harmlessly): before anything is written."""
  for field in PATH_FIELDS:
    section, _, name = field.rpartition(".")
    if section and section not in config:
      continue  # another method's section
    holder = config[section] if section else config
    if name in holder and isinstance(holder[name], str):
      holder[name] = expand_path(holder[name])
  validate(config)
  return config


def min_image_size(arch):
  """The backbone's total stride: on a smaller image its last stage sees only padding
  (the ImageNet backbones halve the image 5 times; resnet_small, for 32x32 digits, 2);
  a ViT's patch."""
  if models.is_vit(arch):
    return vit.VARIANTS[arch]["patch"]
  return 4 if arch in resnet.SMALL else 32


def validate(config):
  """Fails fast (before anything compiles) on settings that cannot work."""
  if config.dataset not in DATASETS:
    raise ValueError(f"unknown dataset {config.dataset!r}; expected one of "
                     f"{', '.join(DATASETS)}")
  if config.arch not in models.ARCHS:
    raise ValueError(f"unknown arch {config.arch!r}; expected one of "
                     f"{', '.join(models.ARCHS)}")
  least = min_image_size(config.arch)
  if int(config.image_size) != config.image_size or config.image_size < least:
    raise ValueError(f"image_size must be an integer >= {least} ({config.arch}'s total "
                     f"stride), got {config.image_size}: it cannot train")
  if config.head_init not in ("",) + models.HEAD_INITS:
    raise ValueError(f"head_init {config.head_init!r} is not one of: '' (the method's "
                     f"reference), {', '.join(models.HEAD_INITS)}")
  method = methods.get(config.method)
  _validate_sections(config, method)
  method.validate(config)
  if not 0 < config.sampling_rate <= 100:
    raise ValueError(f"sampling_rate must be in (0, 100], got {config.sampling_rate}")
  if config.num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {config.num_classes}")
  if config.total_steps < 0 or config.batch_size < 1:
    raise ValueError(f"total_steps must be >= 0 (0: evaluate the initial checkpoint as "
                     f"it is) and batch_size >= 1, got {config.total_steps} and "
                     f"{config.batch_size}")
  _validate_values(config, method)
  _validate_optimizer(config)
  _validate_data(config)


def _validate_optimizer(config):
  from bitune_jax.methods import optimizer  # pylint: disable=g-import-not-at-top
  if config.optimizer not in optimizer.OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {', '.join(optimizer.OPTIMIZERS)}, got "
                     f"{config.optimizer!r}")
  if config.warmup_fraction and config.schedule != "cosine":
    raise ValueError(f"warmup_fraction {config.warmup_fraction} needs schedule='cosine' "
                     f"(the warmup leads into it), got schedule={config.schedule!r}")
  if not models.is_vit(config.arch):
    for field, value in (("drop_path", config.drop_path),
                         ("lr_mult.layer_decay", config.lr_mult.get("layer_decay", 1) - 1)):
      if value:
        raise ValueError(f"{field} is for Vision Transformers; {config.arch} has no "
                         "blocks to drop or decay (set it to "
                         f"{'0' if field == 'drop_path' else '1'})")


def _validate_sections(config, method):
  """Its method's sections (`Method.sections`), and no other method's."""
  for section in method.sections:
    if section not in config:
      raise ValueError(f"a {config.method} config needs its {section!r} section: start "
                       f"from configs/{config.method}.py")
  for section in sorted(method_sections() & set(config.keys())):
    if section not in method.sections:
      raise ValueError(f"this config is {config.method}'s but has the {section!r} "
                       f"section of {_owners(section)}, which {config.method} never "
                       "reads: remove it")


# Settings that cannot train (a negative lr trains to chance, a zero temperature gives
# NaN): field -> rule; each method's own are its `Method.rules`.
_RULES = {
    "eval_batch_size": base.COUNT, "log_every": base.COUNT, "eval_every": base.COUNT,
    "checkpoint_every": base.COUNT,
    "profile_steps": ("an integer >= 0", lambda v: int(v) == v and v >= 0),
    "lr": base.POSITIVE, "momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "weight_decay": base.NON_NEGATIVE,
    "decay_factor": ("in (0, 1]", lambda v: 0 < v <= 1),
    "warmup_fraction": ("in [0, 1)", lambda v: 0 <= v < 1),
    "drop_path": ("in [0, 1)", lambda v: 0 <= v < 1),
    "lr_mult.layer_decay": ("in (0, 1]", lambda v: 0 < v <= 1),
    "data.val_fraction": ("in [0, 1)", lambda v: 0 <= v < 1),
}


def _validate_values(config, method):
  fields = dict({f"lr_mult.{g}": base.NON_NEGATIVE for g in config.lr_mult}, **_RULES,
                **method.rules)
  for field, (what, ok) in fields.items():
    section, _, name = field.rpartition(".")
    if section and section not in config:
      continue
    if name not in (config[section] if section else config):
      continue  # a run's config written before the field existed: its default holds
    value = (config[section] if section else config)[name]
    if not ok(value):
      raise ValueError(f"{field} must be {what}, got {value}: it cannot train")


def _validate_data(config):
  data = config.data
  if data.views not in ("reference", "moco"):
    raise ValueError(f"data.views must be 'reference' or 'moco', got {data.views!r}")
  scale = tuple(data.crop_scale)
  if scale and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
    raise ValueError(f"data.crop_scale must be () or (low, high) with 0 < low <= high "
                     f"<= 1, got {scale}")
  if data.cache_side and data.cache_side < config.image_size:
    raise ValueError(f"data.cache_side {data.cache_side} is smaller than image_size "
                     f"{config.image_size}")
  if int(data.kshot) != data.kshot or data.kshot < 0:
    raise ValueError(f"data.kshot must be a non-negative integer, got {data.kshot}")
