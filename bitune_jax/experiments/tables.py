"""The papers' tables as data: which runs make each number, and the number printed.

A table spec is a Python file in `configs/tables/` defining `TABLE = Table(...)` in
the vocabulary of `bitune_jax.configs.tables`:

* `Column`: one column of the table (a dataset, and the sampling rate, or the k of a
  k-shot setting; `eval` names the protocol its number comes from: "" the run's own
  test metric, "kshot" k-shot transfer of the run's model, "retrieval", "bcubed");
* `Row`: one row (the paper's label, our config `configs/<config>.py`, the arch, the
  pre-trained representation it starts from, config overrides), with the paper's
  number per column label, `(mean, std)` or `(mean, None)` where no std is printed.
  `missing` says why this project cannot run the row yet (empty: it can).

`cells(table)` lists the runnable (row, column) pairs with their `configs/<config>.py`
argument and overrides (the pre-trained checkpoint is a name, `Row.checkpoint`: the
sweep's grid maps it to a file and builds each run's config, `experiments.grid`).
"""

import dataclasses
import importlib
import importlib.util
import os
from typing import Any

from bitune_jax import configs, models
from bitune_jax.configs.tables import (CHECKPOINTS, EVALS, PAPERS, Column, Row,
                                       Table)

@dataclasses.dataclass(frozen=True)
class Cell:
  table: Table
  row: Row
  column: Column

  @property
  def arg(self) -> str:
    """The `configs/<config>.py:ARG` argument: `dataset,arch,rate`, or `demo` (a ViT row:
    `vit_demo`) for the embedded digits (its own source model; the rate is an
    override)."""
    if self.column.dataset == "digits":
      return "vit_demo" if models.is_vit(self.row.arch) else "demo"
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
    raise ValueError(f"{path} defines no TABLE = Table(...) (bitune_jax.configs.tables)")
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


def cells(table: Table) -> list[Cell]:
  """The (row, column) pairs that have a paper number (every pair of a table without
  any: a grid of this project's own), rows that cannot run left out."""
  every = not any(r.numbers for r in table.rows)
  return [Cell(table, r, c) for r in table.rows for c in table.columns
          if (every or c.label in r.numbers) and not r.missing]


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
