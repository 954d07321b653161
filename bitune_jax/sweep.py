"""Runs a whole table: every cell of a grid, one after another, then one results table.

  bitune-sweep --spec configs/tables/bituning_table5.py --workdir DIR \\
      --checkpoint moco_v1_resnet50=moco_v1.npz --seeds 0,1,2
  bitune-sweep --methods finetune,bituning,cotuning --datasets digits \\
      --rates 25,50,100 --seeds 0,1 --workdir DIR      # an ad-hoc grid
  bitune-sweep --workdir DIR --report                  # the table of what exists
  bitune-sweep ... --print_commands                    # one bitune-train line per run

A *run* is one training (config, `dataset,arch,rate`, overrides, checkpoint, seed) in
its own folder `DIR/runs/<name>`; several columns of a table may read one run (the
k-shot columns of unsupervised fine-tuning: one run, several evaluations). A finished
run is skipped, an interrupted one resumes from its checkpoints, a failed one is
recorded in `DIR/failures.json` and the others go on (the exit code is then 1). The
persistent JAX compilation cache lives in `DIR/jax_cache`, so runs after the first of
a shape do not compile again.

`DIR/results.md` and `DIR/results.csv` are written after every run, and by `--report`
at any time: each cell's mean ± sample std over the seeds that exist, their number,
the paper's number where the spec has one, and the difference. `DIR/plots/` holds
each table's accuracy against the sampling rate (or k), with the paper's points, and
each finished run's training curves (`plots/curves/<run>.png`, from its TensorBoard
events).
"""

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import shlex
import statistics
import sys
import time
import traceback
from typing import Any

from bitune_jax import tables

log = logging.getLogger("bitune_jax")

# Where each column's number is read from a run's results (`eval` of `tables.Column`).
_RESULT_KEY = {"": "score", "retrieval": "retrieval_top5",
               "bcubed": "kmeans_bcubed_precision", "linear_probe": "linear_probe_top1"}


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the sweep."""
  config: str  # configs/<config>.py
  arg: str  # its argument: `dataset,arch,rate` or `demo`
  overrides: tuple[tuple[str, Any], ...]  # sorted (dotted key, value)
  checkpoint: str  # a `tables.CHECKPOINTS` name, or "" (the config's own init_from)
  seed: int

  @property
  def name(self) -> str:
    base = f"{self.config}-{self.arg.replace(',', '-')}"
    if self.checkpoint:
      base += f"-{self.checkpoint}"
    if self.overrides:
      digest = hashlib.sha256(json.dumps(self.overrides).encode()).hexdigest()[:8]
      base += f"-{digest}"
    return f"{base}-seed{self.seed}"


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


def _value(text):
  """A `--set` value: JSON where it parses (numbers, true, lists as tuples), else the
  string."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    return text
  return tuple(value) if isinstance(value, list) else value


def cells_from_spec(table: tables.Table, seeds, extra) -> list[Cell]:
  out = []
  for cell in tables.cells(table):
    if not cell.row.config:
      continue  # the checkpoint evaluated as it is: not a run (listed by --report)
    overrides = tuple(sorted({**cell.overrides, **extra}.items()))
    runs = tuple(Run(cell.row.config, cell.arg, overrides, cell.row.checkpoint, s)
                 for s in seeds)
    out.append(Cell(table.name, cell.row.label, cell.column.label, cell.column.eval,
                    cell.column.kshot, cell.paper, runs, cell.column.dataset,
                    float(cell.column.kshot or cell.column.rate)))
  return out


def cells_from_grid(methods, datasets, rates, arch, seeds, extra) -> list[Cell]:
  out = []
  for method in methods:
    for dataset in datasets:
      for rate in rates:
        overrides = dict(extra)
        if dataset == "digits":  # the embedded demo: its own arch, rate as an override
          arg = "demo"
          overrides["sampling_rate"] = float(rate)
        else:
          arg = f"{dataset},{arch},{rate:g}"
        runs = tuple(Run(method, arg, tuple(sorted(overrides.items())), "", s)
                     for s in seeds)
        out.append(Cell("grid", method, f"{dataset} {rate:g}%", "", 0, None, runs,
                        dataset, float(rate)))
  return out


def build_config(run: Run, checkpoints, source=""):
  """The validated config of `run` (`checkpoints`: name -> converted file; `source`:
  the shared digits source model, for the demo's `demo:digits_source`)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from bitune_jax import config_base  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"bitune_jax.configs.{run.config}").get_config(run.arg)
  for key, value in run.overrides:
    tables.set_field(config, key, value)
  if run.checkpoint:
    config.init_from = "none" if run.checkpoint == "none" else checkpoints[run.checkpoint]
  if source and config.init_from == "demo:digits_source":
    config.init_from = source
  config.seed = run.seed
  config_base.validate(config)
  return config


def _digits_source(workdir, run, checkpoints):
  """The demo's source model (supervised on digits 0-4), pre-trained once for the
  whole sweep in `DIR/source` and shared by its digits runs (as `bitune_jax.compare`
  did), instead of once per run."""
  from bitune_jax import train  # pylint: disable=g-import-not-at-top
  return train._demo_pretrained(build_config(run, checkpoints),  # pylint: disable=protected-access
                                os.path.join(workdir, "source"))


def command(run: Run, workdir, checkpoints) -> str:
  """The `bitune-train` line of `run` (for a cluster's job array)."""
  parts = ["bitune-train", "--config", f"configs/{run.config}.py:{run.arg}",
           "--workdir", os.path.join(workdir, "runs", run.name),
           f"--config.seed={run.seed}"]
  if run.checkpoint:
    path = "none" if run.checkpoint == "none" else checkpoints.get(
        run.checkpoint, f"<{run.checkpoint}>")
    parts.append(f"--config.init_from={path}")
  parts += [f"--config.{k}={json.dumps(v) if not isinstance(v, str) else v}"
            for k, v in run.overrides]
  return " ".join(shlex.quote(p) for p in parts)


def _results(workdir, run):
  """The run's numbers: its summary (if finished) and k-shot evaluations, or None."""
  folder = os.path.join(workdir, "runs", run.name)
  path = os.path.join(folder, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    out = json.load(f)
  extra = os.path.join(folder, "sweep_kshot.json")
  if os.path.exists(extra):
    with open(extra) as f:
      out.update(json.load(f))
  return out


def _finished(results, config, shots):
  return (results is not None and results.get("step") == config.total_steps
          and all(f"kshot_{k}_top1" in results for k in shots))


def _number(results, cell):
  if results is None:
    return None
  key = f"kshot_{cell.kshot}_top1" if cell.eval == "kshot" else _RESULT_KEY[cell.eval]
  value = results.get(key)
  return None if value is None else 100.0 * value


def _stats(values):
  if not values:
    return None, None
  mean = statistics.mean(values)
  return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(mean, std):
  if mean is None:
    return "—"
  return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def report(workdir, cells) -> str:
  """Writes `results.md` and `results.csv` from the runs that exist; returns the
  Markdown."""
  rows = []
  for cell in cells:
    values = [v for v in (_number(_results(workdir, r), cell) for r in cell.runs)
              if v is not None]
    mean, std = _stats(values)
    paper_mean, paper_std = cell.paper if cell.paper else (None, None)
    diff = None if mean is None or paper_mean is None else mean - paper_mean
    rows.append((cell, mean, std, len(values), paper_mean, paper_std, diff))
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(["table", "row", "column", "mean", "std", "seeds", "paper_mean",
                   "paper_std", "difference"])
  for cell, mean, std, n, pm, ps, diff in rows:
    writer.writerow([cell.table, cell.row, cell.column] + [
        "" if x is None else (f"{x:.4f}" if isinstance(x, float) else x)
        for x in (mean, std, n, pm, ps, diff)])
  lines, current = [], None
  for cell, mean, std, n, pm, ps, diff in rows:
    if cell.table != current:
      current = cell.table
      lines += ["" if lines else None, f"## {current}", "",
                "| row | column | ours | seeds | paper | ours - paper |",
                "|---|---|---|---|---|---|"]
    lines.append(f"| {cell.row} | {cell.column} | {_fmt(mean, std)} | {n} | "
                 f"{_fmt(pm, ps)} | {'—' if diff is None else f'{diff:+.2f}'} |")
  text = "\n".join(line for line in lines if line is not None) + "\n"
  _write(os.path.join(workdir, "results.csv"), buffer.getvalue())
  _write(os.path.join(workdir, "results.md"), text)
  _plots(workdir, cells, rows)
  return text


def _slug(text):
  return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def _plots(workdir, cells, rows):
  """`DIR/plots/<table>.png` (accuracy against the rate or k, the paper's beside it)
  and `DIR/plots/curves/<run>.png` for each finished run without an up-to-date one."""
  from bitune_jax import plots  # pylint: disable=g-import-not-at-top
  folder = os.path.join(workdir, "plots")
  by_table = {}
  for cell, mean, std, _, pm, ps, _ in rows:
    by_table.setdefault(cell.table, []).append(
        (cell.dataset, cell.row, cell.x, mean, std, pm, ps))
  for table, points in by_table.items():
    plots.accuracy_vs_rate(points, os.path.join(folder, f"{_slug(table)}.png"),
                           title=table, metric="test metric (%), mean ± std over seeds")
  for run in {r for c in cells for r in c.runs}:
    run_dir = os.path.join(workdir, "runs", run.name)
    summary = os.path.join(run_dir, "summary.json")
    target = os.path.join(folder, "curves", f"{run.name}.png")
    if os.path.exists(summary) and (not os.path.exists(target) or os.path.getmtime(
        target) < os.path.getmtime(summary)) and any(
            n.startswith("events.out.tfevents") for n in os.listdir(run_dir)):
      plots.training_curves(run_dir, target, title=run.name)


def _write(path, text):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def run_all(workdir, cells, checkpoints, *, kshot_steps=100):
  """Runs every run of `cells` not yet finished; returns `{run name: error}`."""
  import jax  # pylint: disable=g-import-not-at-top
  from bitune_jax import eval_main, train  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  shots = {}  # run -> the k of its k-shot columns
  for cell in cells:
    for run in cell.runs:
      shots.setdefault(run, set())
      if cell.eval == "kshot":
        shots[run].add(cell.kshot)
  failures_path = os.path.join(workdir, "failures.json")
  failures = {}
  done = skipped = 0
  spent, start = [], time.perf_counter()
  source = ""
  for i, (run, ks) in enumerate(shots.items()):
    folder = os.path.join(workdir, "runs", run.name)
    began = time.perf_counter()
    try:
      config = build_config(run, checkpoints)
      if config.init_from == "demo:digits_source":
        source = source or _digits_source(workdir, run, checkpoints)
        config = build_config(run, checkpoints, source)
      results = _results(workdir, run)
      if _finished(results, config, ks):
        skipped += 1
      else:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        log.info("sweep: run %d/%d %s", i + 1, len(shots), run.name)
        train.train_and_evaluate(config, folder)
        if ks:
          kshot = eval_main.kshot_transfer(folder, shots=sorted(ks), seed=run.seed,
                                           total_steps=kshot_steps)
          _write(os.path.join(folder, "sweep_kshot.json"), json.dumps(kshot))
        spent.append(time.perf_counter() - began)
    except Exception as e:  # pylint: disable=broad-except
      failures[run.name] = f"{type(e).__name__}: {e}"
      log.error("sweep: run %s failed: %s\n%s", run.name, failures[run.name],
                traceback.format_exc(limit=3))
    done += 1
    report(workdir, cells)
    left = len(shots) - done
    eta = (f", ETA {statistics.mean(spent) * left / 60:.1f} min" if spent and left
           else "")
    log.info("sweep: %d/%d runs done (%d already finished, %d failed)%s", done,
             len(shots), skipped, len(failures), eta)
  _write(failures_path, json.dumps(failures, indent=2))
  log.info("sweep: %d runs in %.1f min", len(shots), (time.perf_counter() - start) / 60)
  return failures


def _parse(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--spec", default="", help="a table spec (configs/tables/*.py)")
  parser.add_argument("--methods", default="", help="ad-hoc grid: comma-separated")
  parser.add_argument("--datasets", default="", help="ad-hoc grid: comma-separated")
  parser.add_argument("--rates", default="100", help="ad-hoc grid: sampling rates (%%)")
  parser.add_argument("--arch", default="resnet50", help="ad-hoc grid's arch")
  parser.add_argument("--seeds", default="0", help="comma-separated")
  parser.add_argument("--checkpoint", action="append", default=[],
                      metavar="NAME=PATH", help="a converted file for a spec's checkpoint")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for every run (e.g. total_steps=300)")
  parser.add_argument("--kshot_steps", type=int, default=100)
  parser.add_argument("--print_commands", action="store_true")
  parser.add_argument("--report", action="store_true",
                      help="only write the results table of the runs that exist")
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
  extra = {k: _value(v) for k, v in _pairs(parser, args.set, "set").items()}
  checkpoints = _pairs(parser, args.checkpoint, "checkpoint")
  workdir = os.path.abspath(args.workdir)
  if args.spec:
    if args.methods or args.datasets:
      parser.error("give --spec or an ad-hoc grid (--methods, --datasets), not both")
    try:
      table = tables.load(args.spec)
    except ValueError as e:
      parser.error(str(e))
    cells = cells_from_spec(table, seeds, extra)
  elif args.methods and args.datasets:
    from bitune_jax import config_base, methods  # pylint: disable=g-import-not-at-top
    names, datasets = args.methods.split(","), args.datasets.split(",")
    unknown = [m for m in names if m not in methods.METHODS] + [
        d for d in datasets if d not in config_base.DATASETS]
    if unknown:
      parser.error(f"unknown methods or datasets: {unknown}")
    cells = cells_from_grid(names, datasets, rates, args.arch, seeds, extra)
  else:
    parser.error("give --spec, or --methods and --datasets")
  runs = {r for c in cells for r in c.runs}
  if args.print_commands:
    for run in sorted(runs, key=lambda r: r.name):
      print(command(run, workdir, checkpoints))
    return 0
  os.makedirs(workdir, exist_ok=True)
  console.setup()
  if args.report:
    print(report(workdir, cells), end="")
    return 0
  needed = sorted({r.checkpoint for r in runs} - set(checkpoints) - {"", "none"})
  if needed:
    parser.error("the spec's runs start from checkpoints not given: "
                 + ", ".join(f"--checkpoint {n}=PATH ({tables.CHECKPOINTS[n]})"
                             for n in needed))
  for run in runs:  # every config error before anything trains
    try:
      build_config(run, checkpoints)
    except (ValueError, KeyError) as e:
      parser.error(f"run {run.name}: {e}")
  failures = run_all(workdir, cells, checkpoints, kshot_steps=args.kshot_steps)
  print(report(workdir, cells), end="")
  if failures:
    print(f"{len(failures)} runs failed (see {os.path.join(workdir, 'failures.json')})",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
