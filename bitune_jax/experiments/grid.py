"""A sweep's grid: its runs (`Run`: config, `dataset,arch,rate`, overrides,
checkpoint, seed) and cells (`Cell`: a table's (row, column), the runs that fill it),
from a table spec or an ad-hoc grid, and each run's validated config."""

import dataclasses
import hashlib
import json
import os
from typing import Any

from bitune_jax import models
from bitune_jax.configs import tables as specs
from bitune_jax.experiments import sweep_results, tables


AS_IS = "as_is"  # the name of runs that evaluate a checkpoint as it is


def config_file(config: str) -> str:
  """The `configs/<name>.py` of a run of `config` (a table row's; "": vanilla
  fine-tuning's, with 0 steps: the checkpoint as it is)."""
  from bitune_jax import methods  # pylint: disable=g-import-not-at-top
  return config or methods.VANILLA


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the sweep. `config` "": the pre-trained checkpoint evaluated
  as it is (a table's row without a method): `configs/finetune.py` with 0 steps, whose
  checkpoint is the pre-trained one, for the feature protocols and k-shot transfer."""
  config: str  # configs/<config>.py, or ""
  arg: str  # its argument: `dataset,arch,rate` or `demo`
  overrides: tuple[tuple[str, Any], ...]  # sorted (dotted key, value)
  checkpoint: str  # a `specs.CHECKPOINTS` name, or "" (the config's own init_from)
  seed: int

  @property
  def config_file(self) -> str:
    return config_file(self.config)

  @property
  def name(self) -> str:
    """`<method>-<arg>[-<checkpoint>][-rate<R>][-k<K>][-<digest>]-seed<S>`: the method,
    sampling rate, k and seed at a glance; the digest of every override keeps apart
    runs that differ in others."""
    return self._name(readable=True)

  def _name(self, readable):
    base = f"{self.config or AS_IS}-{self.arg.replace(',', '-')}"
    if self.checkpoint:
      base += f"-{self.checkpoint}"
    if self.overrides:
      given = dict(self.overrides)
      if readable and "sampling_rate" in given:
        base += f"-rate{float(given['sampling_rate']):g}"
      if readable and given.get("data.kshot"):
        base += f"-k{given['data.kshot']}"
      digest = hashlib.sha256(json.dumps(self.overrides).encode()).hexdigest()[:8]
      base += f"-{digest}"
    return f"{base}-seed{self.seed}"

  def folder(self, workdir) -> str:
    """`DIR/runs/<name>`; a run that a sweep of an earlier release made under the name
    without rate and k (`<method>-<arg>-<digest>-seed<S>`) is found there and kept."""
    folder = os.path.join(workdir, "runs", self.name)
    earlier = os.path.join(workdir, "runs", self._name(readable=False))
    return earlier if not os.path.exists(folder) and os.path.isdir(earlier) else folder


@dataclasses.dataclass(frozen=True)
class Cell:
  """One number of the results table: a (row, column) over seeds."""
  table: str
  row: str
  column: str
  eval: str
  kshot: int
  paper: tuple[float, float | None] | None
  runs: tuple[Run, ...]  # one per seed
  dataset: str = ""
  x: float = 0.0  # the sampling rate (%), or k: the x axis of the plots
  params: tuple[tuple[str, Any], ...] = ()  # the values of `--vary` keys of this cell
  metric: str = "test metric (%)"  # what the number is (a spec's `Table.metric`)

  @property
  def label(self) -> str:
    """The row as the table shows it: the row, and the varied values."""
    if not self.params:
      return self.row
    values = ", ".join(f"{sweep_results.short(k)}={v}" for k, v in self.params)
    return f"{self.row} ({values})"


def parse_value(text):
  """A `--set` value: JSON where it parses (numbers, true, lists as tuples), else the
  string."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    return text
  return tuple(value) if isinstance(value, list) else value


def reads(config, key) -> bool:
  """Whether a run of `configs/<config>.py` has the field `key`: not when it is in
  another method's section (`config_base.sections`)."""
  from bitune_jax.training import config_base  # pylint: disable=g-import-not-at-top
  return config_base.foreign_field(config, key) is None


def _own(config, overrides) -> dict:
  """The `overrides` (`--set`) that a run of `configs/<config>.py` reads: e.g.
  `bituning.queue_size` for Bi-tuning's runs, not vanilla fine-tuning's."""
  return {k: v for k, v in overrides.items() if reads(config, k)}


def cells_from_spec(table: specs.Table, seeds, extra, vary=None) -> list[Cell]:
  """The cells of a table spec; a row without a config is its checkpoint evaluated
  as it is (see `Run`)."""
  out = []
  for cell in tables.cells(table):
    overrides = {**cell.overrides, **_own(config_file(cell.row.config), extra)}
    if not cell.row.config:
      overrides["total_steps"] = 0
    runs = tuple(Run(cell.row.config, cell.arg, tuple(sorted(overrides.items())),
                     cell.row.checkpoint, s) for s in seeds)
    out.append(Cell(table.name, cell.row.label, cell.column.label, cell.column.eval,
                    cell.column.kshot, cell.paper, runs, cell.column.dataset,
                    float(cell.column.kshot or cell.column.rate),
                    metric=table.metric))
  return _vary(out, vary)


KSHOTS = (1, 2, 4, 8)  # the k-shot columns of methods trained without labels


def cells_from_grid(methods, datasets, rates, arch, seeds, extra, vary=None
                    ) -> list[Cell]:
  """An ad-hoc grid. A method trained without labels (unsupervised fine-tuning) gets
  the feature protocols' columns and k-shot transfer (k = `KSHOTS`) instead of a test
  accuracy, as in the unsupervised fine-tuning paper."""
  from bitune_jax import methods as methods_lib  # pylint: disable=g-import-not-at-top
  out = []
  for method in methods:
    if methods_lib.get(method).evaluation == "features":
      evals = [("retrieval", 0), ("bcubed", 0), ("linear_probe", 0)] + [
          ("kshot", k) for k in KSHOTS]
    else:
      evals = [("", 0)]
    for dataset in datasets:
      for rate in rates:
        overrides = _own(method, extra)
        if dataset == "digits":  # the embedded demo: its own arch, rate as an override
          arg = "vit_demo" if models.is_vit(arch) else "demo"
          overrides["sampling_rate"] = float(rate)
        else:
          arg = f"{dataset},{arch},{rate:g}"
        runs = tuple(Run(method, arg, tuple(sorted(overrides.items())), "", s)
                     for s in seeds)
        for name, k in evals:
          column = f"{dataset} {rate:g}%" + (
              f" {k}-shot" if k else f" {name.replace('_', ' ')}" if name else "")
          out.append(Cell("grid", method, column, name, k, None, runs, dataset,
                          float(rate)))
  return _vary(out, vary)


def _vary(cells, vary):
  """Each cell once per combination of the `vary` values (`{key: [values]}`) of the
  keys its runs read (`reads`), the values set in its runs' overrides and recorded in
  `Cell.params`."""
  if not vary:
    return cells
  import itertools  # pylint: disable=g-import-not-at-top
  out = []
  for cell in cells:
    keys = [k for k in sorted(vary) if reads(cell.runs[0].config_file, k)]
    for values in itertools.product(*(vary[k] for k in keys)):
      params = tuple(zip(keys, values))
      runs = tuple(dataclasses.replace(r, overrides=tuple(sorted(
          {**dict(r.overrides), **dict(params)}.items()))) for r in cell.runs)
      out.append(dataclasses.replace(cell, runs=runs, params=params))
  return out


def build_config(run: Run, checkpoints, source=""):
  """The validated config of `run` (`checkpoints`: name -> converted file; `source`:
  the shared digits source model, for the demo's `demo:digits_source`)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from bitune_jax.training import config_base  # pylint: disable=g-import-not-at-top
  from bitune_jax.experiments import demo  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(
      f"bitune_jax.configs.{run.config_file}").get_config(run.arg)
  for key, value in run.overrides:
    tables.set_field(config, key, value)
  if run.checkpoint:
    config.init_from = ("none" if run.checkpoint == "none"
                        else checkpoints[checkpoint_name(run, checkpoints)])
  if source and config.init_from == demo.NAME:
    config.init_from = source
  config.seed = run.seed
  config_base.validate(config)
  return config


def checkpoint_name(run: Run, checkpoints) -> str:
  """The `--checkpoint` name that gives `run`'s checkpoint: `NAME@DATASET` where given
  (a checkpoint of each dataset, e.g. `unsupft_resnet50@pets`: an unsupervised
  fine-tuning run exported by bitune-export), else `NAME`."""
  dataset = run.arg.split(",")[0]
  specific = f"{run.checkpoint}@{dataset}"
  return specific if specific in checkpoints or specs.CHECKPOINTS.get(
      run.checkpoint, "").startswith(specs.PER_DATASET) else run.checkpoint
