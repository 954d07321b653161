"""The papers' tables as data: which runs make each number, and the number printed.

A table spec is a Python file in `configs/tables/` (shipped in the package as
`bitune_jax/configs/tables/`) defining `TABLE = Table(...)`:

* `Column`: one column of the table (a dataset, and the sampling rate, or the k of a
  k-shot setting; `eval` names the protocol its number comes from: "" the run's own
  test metric, "kshot" k-shot transfer of the run's model, "retrieval", "bcubed");
* `Row`: one row (the paper's label, our config `configs/<config>.py`, the arch, the
  pre-trained representation it starts from, config overrides), with the paper's
  number per column label, `(mean, std)` or `(mean, None)` where no std is printed.
  `missing` says why this project cannot run the row yet (empty: it can).

`cells(table)` lists the runnable (row, column) pairs with their `configs/<config>.py`
argument and overrides; `build_config(cell)` makes and validates the config of one
(the pre-trained checkpoint is a name, `Row.checkpoint`: a sweep maps it to a file).
"""

import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

from bitune_jax import configs

# The papers a table comes from; "" for a grid of this project's own (no paper numbers:
# every (row, column) is a cell), e.g. the offline digits grid.
PAPERS = ("bi-tuning", "co-tuning", "unsupervised-finetuning", "")
EVALS = ("", "kshot", "retrieval", "bcubed", "linear_probe")
# The pre-trained representations the tables start from (names, not files).
CHECKPOINTS = {
    "supervised_resnet50": "ImageNet supervised ResNet-50 (torchvision)",
    "supervised_resnet101": "ImageNet supervised ResNet-101 (torchvision)",
    "supervised_densenet121": "ImageNet supervised DenseNet-121 (torchvision)",
    "moco_v1_resnet50": "MoCo v1 ResNet-50, 200 epochs on ImageNet",
    "moco_v2_resnet50": "MoCo v2 ResNet-50, 800 epochs on ImageNet",
    "simclr_1x_resnet50": "SimCLR v1 ResNet-50 (1x)",
    "simclr_2x_resnet50": "SimCLR v1 ResNet-50 (2x)",
    "insdisc_resnet50": "InsDisc ResNet-50",
    "deepcluster_resnet50": "DeepCluster-v2 ResNet-50 (the SwAV repository's)",
    "cmc_resnet50": "CMC ResNet-50",
    "unsupft_resnet50": "per dataset: an unsup_finetune run from moco_v2_resnet50 on "
                        "that dataset, exported by bitune-export",
    "none": "random initialisation",
}
# A checkpoint described so is given per dataset: `--checkpoint NAME@DATASET=FILE`.
PER_DATASET = "per dataset:"


@dataclasses.dataclass(frozen=True)
class Column:
  label: str  # as in the paper, e.g. "CUB 25%"
  dataset: str  # our dataset name (`config_base.DATASETS`)
  rate: float = 100.0  # sampling rate of the labelled training data, %
  kshot: int = 0  # k labelled images per class (0: use `rate`)
  eval: str = ""  # the protocol the number comes from (`EVALS`)


@dataclasses.dataclass(frozen=True)
class Row:
  label: str  # as in the paper, e.g. "Bi-tuning", "L2SP (Li et al., 2018)"
  # configs/<config>.py (a method), e.g. "bituning"; "" for the pre-trained
  # checkpoint evaluated as it is (no training run; e.g. the k-shot transfer of
  # "Unsup-S" in the unsupervised fine-tuning paper)
  config: str
  arch: str
  checkpoint: str  # a `CHECKPOINTS` name; "": the config's own init_from (digits)
  numbers: Mapping[str, tuple[float, float | None]]  # column label -> (mean, std)
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  missing: str = ""  # why it cannot run here yet; "" when it can


@dataclasses.dataclass(frozen=True)
class Table:
  paper: str  # one of PAPERS
  number: int
  title: str  # the paper's caption, shortened
  metric: str  # what the numbers are, e.g. "top-1 accuracy (%)"
  columns: tuple[Column, ...]
  rows: tuple[Row, ...]
  notes: str = ""  # transcription notes (e.g. what the extracted text left ambiguous)

  @property
  def name(self) -> str:
    return f"{self.paper} table {self.number}" if self.paper else self.title


@dataclasses.dataclass(frozen=True)
class Cell:
  table: Table
  row: Row
  column: Column

  @property
  def arg(self) -> str:
    """The `configs/<config>.py:ARG` argument: `dataset,arch,rate`, or `demo` for the
    embedded digits (its own arch and source model; the rate is an override)."""
    if self.column.dataset == "digits":
      return "demo"
    rate = 100 if self.column.kshot else self.column.rate
    return f"{self.column.dataset},{self.row.arch},{rate:g}"

  @property
  def overrides(self) -> dict[str, Any]:
    out = dict(self.row.overrides)
    if self.column.kshot and self.column.eval != "kshot":
      out["data.kshot"] = self.column.kshot  # trained on k labelled images per class
    if self.column.dataset == "digits":  # as `arg`'s rate for the other datasets
      out["sampling_rate"] = 100.0 if self.column.kshot else float(self.column.rate)
    return out

  @property
  def paper(self) -> tuple[float, float | None] | None:
    return self.row.numbers.get(self.column.label)


def load(path: str) -> Table:
  """The `TABLE` of a spec file: `path`, or the shipped spec of its name
  (`configs.find`: `configs/tables/X.py` or `X`, from any directory)."""
  path = configs.find(path, folder="tables")
  if not os.path.isfile(path):
    raise ValueError(f"no table spec at {path}")
  spec = importlib.util.spec_from_file_location(
      f"bitune_table_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  table = getattr(module, "TABLE", None)
  if not isinstance(table, Table):
    raise ValueError(f"{path} defines no TABLE = tables.Table(...)")
  check(table)
  return table


def check(table: Table) -> None:
  """Fails on a malformed spec: unknown names, numbers for no column, duplicates."""
  from bitune_jax.training import config_base  # pylint: disable=g-import-not-at-top
  if table.paper not in PAPERS:
    raise ValueError(f"{table.name}: paper must be one of {PAPERS}")
  labels = [c.label for c in table.columns]
  if len(set(labels)) != len(labels):
    raise ValueError(f"{table.name}: duplicate column labels")
  for c in table.columns:
    if c.dataset not in config_base.DATASETS:
      raise ValueError(f"{table.name}: column {c.label!r}: unknown dataset {c.dataset!r}")
    if c.eval not in EVALS:
      raise ValueError(f"{table.name}: column {c.label!r}: eval must be one of {EVALS}")
  for r in table.rows:
    if r.checkpoint and r.checkpoint not in CHECKPOINTS:
      raise ValueError(f"{table.name}: row {r.label!r}: unknown checkpoint "
                       f"{r.checkpoint!r}")
    extra = set(r.numbers) - set(labels)
    if extra:
      raise ValueError(f"{table.name}: row {r.label!r}: numbers for no column: "
                       f"{sorted(extra)}")


def cells(table: Table, *, runnable_only: bool = True) -> list[Cell]:
  """The (row, column) pairs that have a paper number (every pair of a table without
  any: a grid of this project's own), rows that cannot run left out unless
  `runnable_only` is False."""
  every = not any(r.numbers for r in table.rows)
  return [Cell(table, r, c) for r in table.rows for c in table.columns
          if (every or c.label in r.numbers) and (not runnable_only or not r.missing)]


def set_field(config, dotted: str, value: Any) -> None:
  """`config.<dotted> = value` for an existing field (else an error naming it, or the
  method whose section it is in)."""
  from bitune_jax.training import config_base  # pylint: disable=g-import-not-at-top
  foreign = config_base.foreign_field(config.method, dotted)
  if foreign:
    raise ValueError(foreign)
  *path, last = dotted.split(".")
  node = config
  for part in path:
    node = node[part]
  if last not in node:
    raise ValueError(f"unknown config field {dotted!r}")
  node[last] = value


def build_config(cell: Cell, *, seed: int = 0):
  """The validated `ml_collections` config of one cell (its checkpoint not set)."""
  from bitune_jax.training import config_base  # pylint: disable=g-import-not-at-top
  if cell.row.missing:
    raise ValueError(f"{cell.table.name}, {cell.row.label}: {cell.row.missing}")
  if not cell.row.config:
    raise ValueError(f"{cell.table.name}, {cell.row.label}: the checkpoint evaluated as "
                     "it is, no training run")
  module = importlib.import_module(f"bitune_jax.configs.{cell.row.config}")
  config = module.get_config(cell.arg)
  for key, value in cell.overrides.items():
    set_field(config, key, value)
  config.seed = seed
  config_base.validate(config)
  return config
