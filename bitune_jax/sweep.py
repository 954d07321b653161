"""Runs a whole table: every cell of a grid, one after another, then one results table.

  bitune-sweep --spec configs/tables/bituning_table5.py --workdir DIR \\
      --checkpoint moco_v1_resnet50=moco_v1.npz --seeds 0,1,2
  bitune-sweep --spec configs/tables/digits.py --workdir DIR --seeds 0,1  # offline
  bitune-sweep --methods finetune,bituning,cotuning --datasets digits \\
      --rates 25,50,100 --seeds 0,1 --workdir DIR      # an ad-hoc grid
  bitune-sweep ... --vary bituning.queue_size=2,4,8    # K's sensitivity (Figure 2)
  bitune-sweep ... --report                            # the table of what exists
  bitune-sweep ... --print_commands                    # one bitune-train line per run
                                                       # (after one that makes the source)

A *run* is one training (config, `dataset,arch,rate`, overrides, checkpoint, seed) in
its own folder `DIR/runs/<name>`; several columns of a table may read one run (the
k-shot columns of unsupervised fine-tuning: one run, several evaluations). A finished
run is skipped, an interrupted one resumes from its checkpoints, a failed one is
recorded in `DIR/failures.json` and the others go on (the exit code is then 1). Ctrl-C
(SIGINT) or SIGTERM, in whatever phase (the source model's pre-training, a run's
training, its evaluations), stops the sweep with 130 / 143 once the run in progress
has saved its step; nothing is recorded as failed, and the same command resumes. The
persistent JAX compilation cache lives in `DIR/jax_cache`, so runs after the first of
a shape do not compile again.

`--print_commands` prints the sweep's runs as commands: first the `bitune-sweep ...
--source_only` line that pre-trains the digits runs' shared source model, then each
run's `bitune-train` line, from that source. A run folder whose `config.json` is not
the sweep's run (another init_from, say) is neither counted in the table nor trained
on: the sweep refuses it in `failures.json`.

A spec row without a method is its pre-trained checkpoint evaluated as it is (0
steps; see `Run`). A method trained without labels gets, in an ad-hoc grid, the
feature protocols' columns and k-shot transfer. `--vary KEY=V1,V2,...` runs every cell
once per value. A `--set` or `--vary` key in a method's section (`bituning.queue_size`)
goes to that method's runs only: the others' configs have no such field.

`DIR/results.md` and `DIR/results.csv` are written after every run, and by `--report`
at any time: each cell's mean ± sample std over the seeds that exist, their number,
the paper's number where the spec has one, and the difference. `DIR/plots/` holds
each table's accuracy against the sampling rate (or k), with the paper's points; for
each `--vary` key, the metric against its value (`sensitivity_<key>.png`: K and L as
in Bi-tuning Figure 2); and each finished run's training curves
(`plots/curves/<run>.png`, from its TensorBoard events).
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import signal
import statistics
import sys
import time
import traceback
from typing import Any

from bitune_jax import sweep_results, tables

log = logging.getLogger("bitune_jax")


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
  checkpoint: str  # a `tables.CHECKPOINTS` name, or "" (the config's own init_from)
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




def _value(text):
  """A `--set` value: JSON where it parses (numbers, true, lists as tuples), else the
  string."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    return text
  return tuple(value) if isinstance(value, list) else value


def _reads(config, key) -> bool:
  """Whether a run of `configs/<config>.py` has the field `key`: not when it is in
  another method's section (`config_base.SECTIONS`)."""
  from bitune_jax import config_base  # pylint: disable=g-import-not-at-top
  return config_base.foreign_field(config, key) is None


def _own(config, overrides) -> dict:
  """The `overrides` (`--set`) that a run of `configs/<config>.py` reads: e.g.
  `bituning.queue_size` for Bi-tuning's runs, not vanilla fine-tuning's."""
  return {k: v for k, v in overrides.items() if _reads(config, k)}


def cells_from_spec(table: tables.Table, seeds, extra, vary=None) -> list[Cell]:
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
          arg = "demo"
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
  keys its runs read (`_reads`), the values set in its runs' overrides and recorded in
  `Cell.params`."""
  if not vary:
    return cells
  import itertools  # pylint: disable=g-import-not-at-top
  out = []
  for cell in cells:
    keys = [k for k in sorted(vary) if _reads(cell.runs[0].config_file, k)]
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
  from bitune_jax import config_base  # pylint: disable=g-import-not-at-top
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
  return specific if specific in checkpoints or tables.CHECKPOINTS.get(
      run.checkpoint, "").startswith(tables.PER_DATASET) else run.checkpoint


def _digits_source(workdir, run, checkpoints):
  """The demo's source model (supervised on digits 0-4), pre-trained once for the
  whole sweep in `DIR/source` and shared by its digits runs, instead of once per
  run; `run` is the first run that needs it
  (`_source_run`), whose config the pre-training takes its seed and sizes from."""
  from bitune_jax.experiments import demo  # pylint: disable=g-import-not-at-top
  return demo.source_model(build_config(run, checkpoints),
                           os.path.join(workdir, "source"))


def source_file(workdir) -> str:
  """The sweep's shared digits source model (written by `_digits_source`)."""
  from bitune_jax.experiments import demo  # pylint: disable=g-import-not-at-top
  return demo.source_file(os.path.join(workdir, "source"))


def _uses_source(run, checkpoints) -> bool:
  from bitune_jax.experiments import demo  # pylint: disable=g-import-not-at-top
  return not run.checkpoint and (
      build_config(run, checkpoints).init_from == demo.NAME)


def _ordered_runs(cells) -> dict:
  """`{run: the result keys of its cells}`, in the order the sweep runs them."""
  needs = {}
  for cell in cells:
    for run in cell.runs:
      needs.setdefault(run, set()).add(sweep_results.key(cell))
  return needs


def _source_run(cells, checkpoints):
  """The run the shared source model is made for (the first that needs it), or None."""
  return next((r for r in _ordered_runs(cells) if _uses_source(r, checkpoints)), None)


def made_otherwise(workdir, run, checkpoints) -> dict:
  """`{field: (recorded, the sweep's)}` where `DIR/runs/<run>/config.json` is not the
  run this sweep makes (e.g. another init_from: a run that pre-trained its own source
  model); fields a resumed run may change (`records.RESUMABLE`) do not count. `{}` when
  nothing is recorded, or the sweep's config cannot be built (a checkpoint not given)."""
  from bitune_jax.training import records  # pylint: disable=g-import-not-at-top
  folder = run.folder(workdir)
  if not os.path.exists(os.path.join(folder, "config.json")):
    return {}
  try:
    config = build_config(run, checkpoints, source_file(workdir))
  except (KeyError, ValueError):
    return {}
  return {k: v for k, v in records.config_changes(config, folder).items()
          if k not in records.RESUMABLE}


def _report(workdir, cells, checkpoints) -> str:
  """The results table, without the runs made otherwise than this sweep's."""
  foreign = {r.name for r in _ordered_runs(cells)
             if made_otherwise(workdir, r, checkpoints)}
  return sweep_results.report(workdir, cells, exclude=foreign)


def command(run: Run, workdir, checkpoints) -> str:
  """The `bitune-train` line of `run` (for a cluster's job array): the run the sweep
  makes, from the sweep's shared source model where it uses one (`source_command`
  makes it first)."""
  parts = ["bitune-train", "--config", f"configs/{run.config_file}.py:{run.arg}",
           "--workdir", run.folder(workdir),
           f"--config.seed={run.seed}"]
  if run.checkpoint:
    name = checkpoint_name(run, checkpoints)
    path = "none" if run.checkpoint == "none" else checkpoints.get(name, f"<{name}>")
    parts.append(f"--config.init_from={path}")
  elif _uses_source(run, checkpoints):
    parts.append(f"--config.init_from={source_file(workdir)}")
  parts += [f"--config.{k}={json.dumps(v) if not isinstance(v, str) else v}"
            for k, v in run.overrides]
  return " ".join(shlex.quote(p) for p in parts)


_FEATURE_KEYS = ("retrieval_top5", "kmeans_bcubed_precision", "linear_probe_top1")


class Interrupted(Exception):
  """The sweep stopped on a signal (`signum`); the run in progress saved its step (or
  had not started), nothing is recorded as failed, and the same command resumes."""

  def __init__(self, signum, where):
    self.signum = signum
    super().__init__(f"stopped by {signal.Signals(signum).name} {where}; the same "
                     "command resumes")


def _stop_if_asked(signals, where):
  """Between phases (source, training, evaluations, runs): a signal got during the last
  one stops the sweep here."""
  if signals.signum is not None:
    raise Interrupted(signals.signum, where)


def _train_and_evaluate(run, config, folder, keys, kshot_steps, signals):
  """Trains (or resumes) the run, then what its cells need beyond its summary: the
  feature protocols (`sweep_features.json`) and k-shot transfer (`sweep_kshot.json`),
  stopping between these phases on a signal (each training phase stops on its own).
  Holds the run folder's lock: no bitune-train or bitune-eval in it meanwhile."""
  # pylint: disable-next=g-import-not-at-top
  from bitune_jax import workdir_lock
  from bitune_jax.experiments import demo, protocols
  with workdir_lock.hold(folder, "bitune-sweep"):
    summary = demo.train_and_evaluate(config, folder)[1]
    _stop_if_asked(signals, f"after training {run.name}")
    if any(k in keys and k not in summary for k in _FEATURE_KEYS):
      metrics = protocols.evaluate_workdir(folder)
      sweep_results.write(os.path.join(folder, "sweep_features.json"),
             json.dumps({k: metrics[k] for k in _FEATURE_KEYS}))
      _stop_if_asked(signals, f"after evaluating {run.name}")
    shots = sorted(int(k.split("_")[1]) for k in keys if k.startswith("kshot_"))
    if shots:
      kshot = protocols.kshot_transfer(folder, shots=shots, seed=run.seed,
                                       total_steps=kshot_steps)
      sweep_results.write(os.path.join(folder, "sweep_kshot.json"), json.dumps(kshot))


def run_all(workdir, cells, checkpoints, *, kshot_steps=100):
  """Runs every run of `cells` not yet finished; returns `{run name: error}`. SIGINT
  or SIGTERM stops it (`Interrupted`) once the run in progress has saved its step."""
  from bitune_jax import stopping  # pylint: disable=g-import-not-at-top
  signals = stopping.StopSignals(
      "the sweep stops once the current phase has saved its state")
  signals.install()
  try:
    return _run_all(workdir, cells, checkpoints, kshot_steps, signals)
  finally:
    signals.restore()


def _run_all(workdir, cells, checkpoints, kshot_steps, signals):
  import jax  # pylint: disable=g-import-not-at-top
  from bitune_jax import stopping  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  needs = _ordered_runs(cells)  # run -> the result keys of its cells
  failures_path = os.path.join(workdir, "failures.json")
  failures, reached = {}, set()
  done = skipped = 0
  spent, start = [], time.perf_counter()
  source = ""
  for i, (run, keys) in enumerate(needs.items()):
    folder = run.folder(workdir)
    began = time.perf_counter()
    try:
      _stop_if_asked(signals, f"before run {run.name}")
      reached.add(run.name)
      config = build_config(run, checkpoints)
      if config.init_from == "demo:digits_source":
        source = source or _digits_source(workdir, run, checkpoints)
        _stop_if_asked(signals, "after pre-training the source model")
        config = build_config(run, checkpoints, source)
      otherwise = made_otherwise(workdir, run, checkpoints)
      if otherwise:  # not this sweep's run: neither counted nor trained on
        raise ValueError(
            f"{folder} holds a run made otherwise than this sweep's (" + ", ".join(
                f"{k}={a!r}, the sweep's {b!r}" for k, (a, b) in otherwise.items())
            + "): not counted; move it away and run the sweep again")
      results = sweep_results.results(workdir, run)
      if sweep_results.finished(results, config, keys):
        skipped += 1
      else:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        log.info("sweep: run %d/%d %s", i + 1, len(needs), run.name)
        _train_and_evaluate(run, config, folder, keys, kshot_steps, signals)
        spent.append(time.perf_counter() - began)
    except stopping.Stopped as e:  # saved at its step: the next sweep resumes there
      _stopped(workdir, cells, checkpoints, failures, reached, failures_path)
      raise Interrupted(e.signum, f"during {run.name}, whose step {e.step} is saved in "
                        f"{e.directory}") from None
    except Interrupted:
      _stopped(workdir, cells, checkpoints, failures, reached, failures_path)
      raise
    except Exception as e:  # pylint: disable=broad-except
      failures[run.name] = f"{type(e).__name__}: {e}"
      log.error("sweep: run %s failed: %s\n%s", run.name, failures[run.name],
                traceback.format_exc(limit=3))
    done += 1
    _report(workdir, cells, checkpoints)
    left = len(needs) - done
    eta = (f", ETA {statistics.mean(spent) * left / 60:.1f} min" if spent and left
           else "")
    log.info("sweep: %d/%d runs done (%d already finished, %d failed)%s", done,
             len(needs), skipped, len(failures), eta)
  sweep_results.write(failures_path, json.dumps(failures, indent=2))
  log.info("sweep: %d runs in %.1f min", len(needs), (time.perf_counter() - start) / 60)
  _stop_if_asked(signals, "after its last run")
  return failures


def _stopped(workdir, cells, checkpoints, failures, reached, failures_path):
  """A stopped sweep's records: the table of what exists, and `failures.json` with
  this sweep's failures and an earlier sweep's of the runs this one did not reach."""
  earlier = {}
  if os.path.exists(failures_path):
    with open(failures_path) as f:
      earlier = json.load(f)
  kept = {k: v for k, v in earlier.items() if k not in reached}
  sweep_results.write(failures_path, json.dumps({**kept, **failures}, indent=2))
  _report(workdir, cells, checkpoints)


def source_command(argv, workdir) -> str:
  """The `bitune-sweep` line that pre-trains the sweep's shared source model: this
  sweep's own arguments (so the same run gives the source its seed and sizes), with
  `--source_only`."""
  parts, skip = ["bitune-sweep", "--workdir", workdir], False
  for arg in argv:
    if skip:
      skip = False
    elif arg == "--workdir":
      skip = True
    elif not arg.startswith(("--workdir=", "--print_commands")):
      parts.append(arg)
  return " ".join(shlex.quote(p) for p in parts + ["--source_only"])


def _make_source(workdir, cells, checkpoints):
  """`--source_only`: the shared source model as `run_all` makes it."""
  from bitune_jax import stopping  # pylint: disable=g-import-not-at-top
  run = _source_run(cells, checkpoints)
  if run is None:
    print("bitune-sweep: no run of this sweep uses the digits source model",
          file=sys.stderr)
    return 2
  try:
    print(_digits_source(workdir, run, checkpoints))
  except stopping.Stopped as e:
    print(f"bitune-sweep: {e}", file=sys.stderr)
    return 128 + e.signum
  return 0


def _parse(argv):
  first, _, rest = __doc__.partition("\n")
  parser = argparse.ArgumentParser(  # the summary once, the examples and rules after
      prog="bitune-sweep", description=first,
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest.strip("\n"))
  parser.add_argument("--workdir", required=True,
                      help="DIR: runs/, source/, results.md/csv, plots/ (required)")
  parser.add_argument("--spec", default="",
                      help="a table spec, e.g. configs/tables/digits.py (default: none; "
                           "else give --methods and --datasets)")
  parser.add_argument("--methods", default="",
                      help="ad-hoc grid: comma-separated methods (bitune-train --list)")
  parser.add_argument("--datasets", default="",
                      help="ad-hoc grid: comma-separated datasets")
  parser.add_argument("--rates", default="100",
                      help="ad-hoc grid: comma-separated sampling rates in %% "
                           "(default: %(default)s)")
  parser.add_argument("--arch", default="resnet50",
                      help="ad-hoc grid: the backbone of non-digits datasets "
                           "(default: %(default)s)")
  parser.add_argument("--seeds", default="0",
                      help="comma-separated seeds, one run each (default: %(default)s)")
  parser.add_argument("--checkpoint", action="append", default=[],
                      metavar="NAME=PATH",
                      help="a converted file for a spec's checkpoint NAME; NAME@DATASET "
                           "for one dataset's (repeatable)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for every run that reads KEY, e.g. "
                           "total_steps=300 (repeatable)")
  parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2,...",
                      help="run every cell once per value (per combination, if "
                           "several); e.g. bituning.queue_size=8,16,32 draws K's "
                           "sensitivity (Bi-tuning Figure 2) (repeatable)")
  parser.add_argument("--kshot_steps", type=int, default=100,
                      help="training steps of each k-shot transfer (default: "
                           "%(default)s)")
  parser.add_argument("--print_commands", action="store_true",
                      help="print the sweep's runs as commands: first the one that "
                           "pre-trains the shared digits source model (if a run uses "
                           "it), then one bitune-train line per run; run nothing")
  parser.add_argument("--source_only", action="store_true",
                      help="only pre-train the shared digits source model (DIR/source)")
  parser.add_argument("--report", action="store_true",
                      help="only write the results table of the runs that exist")
  from bitune_jax import console  # pylint: disable=g-import-not-at-top
  parser.add_argument("--version", action="version",
                      version=f"bitune-sweep {console.version()}")
  return parser, parser.parse_args(argv)


def _pairs(parser, items, what):
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      parser.error(f"--{what} takes NAME=VALUE, got {item!r}")
    out[key] = value
  return out


def main(argv=None):
  from bitune_jax import console  # pylint: disable=g-import-not-at-top
  parser, args = _parse(argv)
  try:
    seeds = [int(s) for s in args.seeds.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
  except ValueError:
    parser.error(f"--seeds and --rates take comma-separated numbers, got "
                 f"{args.seeds!r} / {args.rates!r}")
  if args.kshot_steps < 1:
    parser.error(f"--kshot_steps must be >= 1, got {args.kshot_steps}")
  extra = {k: _value(v) for k, v in _pairs(parser, args.set, "set").items()}
  vary = {k: [_value(x) for x in v.split(",")]
          for k, v in _pairs(parser, args.vary, "vary").items()}
  for key, values in vary.items():
    if len(values) < 2 or len(set(map(str, values))) != len(values) or key in extra:
      parser.error(f"--vary {key}: give two or more different values, and not also "
                   f"--set {key}; got {values}")
  checkpoints = _pairs(parser, args.checkpoint, "checkpoint")
  from bitune_jax import config_base  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(config_base.expand_path(args.workdir))  # `~` after `=`
  if args.spec:
    if args.methods or args.datasets:
      parser.error("give --spec or an ad-hoc grid (--methods, --datasets), not both")
    try:
      table = tables.load(args.spec)
    except ValueError as e:
      parser.error(str(e))
    cells = cells_from_spec(table, seeds, extra, vary)
  elif args.methods and args.datasets:
    from bitune_jax import methods  # pylint: disable=g-import-not-at-top
    names, datasets = args.methods.split(","), args.datasets.split(",")
    unknown = [m for m in names if m not in methods.METHODS] + [
        d for d in datasets if d not in config_base.DATASETS]
    if unknown:
      parser.error(f"unknown methods or datasets: {unknown}")
    cells = cells_from_grid(names, datasets, rates, args.arch, seeds, extra, vary)
  else:
    parser.error("give --spec, or --methods and --datasets")
  runs = {r for c in cells for r in c.runs}
  for what, keys in (("set", extra), ("vary", vary)):
    for key in keys:  # another method's field: set in that method's runs, if any
      if runs and not any(_reads(r.config_file, key) for r in runs):
        first = min(runs, key=lambda r: r.name)
        parser.error(f"--{what} {key}: no run of this sweep reads it: "
                     f"{config_base.foreign_field(first.config_file, key)}")
  if args.print_commands:
    if _source_run(cells, checkpoints) is not None:
      print(source_command(argv if argv is not None else sys.argv[1:], workdir))
    for run in sorted(runs, key=lambda r: r.name):
      print(command(run, workdir, checkpoints))
    return 0
  console.setup()
  if args.report:
    return _locked(parser, workdir, lambda: _print_report(workdir, cells, checkpoints))
  needed = sorted({checkpoint_name(r, checkpoints) for r in runs if r.checkpoint}
                  - set(checkpoints) - {"none"})
  if needed:
    parser.error("the spec's runs start from checkpoints not given: "
                 + ", ".join(f"--checkpoint {n}=PATH ({tables.CHECKPOINTS[n.split('@')[0]]})"
                             for n in needed))
  for run in runs:  # every config error before anything trains
    try:
      build_config(run, checkpoints)
    except (ValueError, KeyError) as e:
      parser.error(f"run {run.name}: {e}")
  # A command refused above leaves nothing behind.
  if args.source_only:
    return _locked(parser, workdir, lambda: _make_source(workdir, cells, checkpoints))
  return _locked(parser, workdir, lambda: _run_and_report(workdir, cells, checkpoints,
                                                          args.kshot_steps))


def _print_report(workdir, cells, checkpoints):
  print(_report(workdir, cells, checkpoints), end="")
  return 0


def _run_and_report(workdir, cells, checkpoints, kshot_steps):
  try:
    failures = run_all(workdir, cells, checkpoints, kshot_steps=kshot_steps)
  except Interrupted as e:  # SIGINT or SIGTERM: saved, resumable, nothing failed
    print(f"bitune-sweep: {e}", file=sys.stderr)
    return 128 + e.signum
  except KeyboardInterrupt:  # a second Ctrl-C: at once
    print("bitune-sweep: interrupted at once (a second Ctrl-C); the run in progress "
          "resumes from its last checkpoint with the same command", file=sys.stderr)
    return 130
  print(_report(workdir, cells, checkpoints), end="")
  if failures:
    print(f"{len(failures)} runs failed (see {os.path.join(workdir, 'failures.json')})",
          file=sys.stderr)
    return 1
  return 0


def _locked(parser, workdir, body):
  """`body()` holding DIR's lock; a DIR held by another command is refused (exit 2)."""
  from bitune_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  try:
    workdir_lock.check_workdir(workdir)  # a file, under a file, not writable
  except ValueError as e:
    parser.exit(2, f"bitune-sweep: error: {e}\n")
  try:
    with workdir_lock.hold(workdir, "bitune-sweep"):
      os.makedirs(workdir, exist_ok=True)
      return body()
  except workdir_lock.InUse as e:  # DIR, or a run folder that a bitune-train is in
    parser.exit(2, f"bitune-sweep: error: {e}\n")


if __name__ == "__main__":
  sys.exit(main())
