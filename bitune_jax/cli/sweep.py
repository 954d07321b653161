"""`bitune-sweep`: the command line of `bitune_jax.experiments.sweep` (its docstring is
the help); jax and the training system are imported once a sweep runs, so `--help`
answers at once."""

import argparse
import os
import sys

from bitune_jax.cli import console
from bitune_jax.configs import tables as specs
from bitune_jax.experiments import grid, sweep, tables

# pylint: disable=g-import-not-at-top


def _parse(argv):
  first, _, rest = sweep.__doc__.partition("\n")
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
  console.add_version(parser)
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
  parser, args = _parse(argv)
  try:
    seeds = [int(s) for s in args.seeds.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
  except ValueError:
    parser.error(f"--seeds and --rates take comma-separated numbers, got "
                 f"{args.seeds!r} / {args.rates!r}")
  if args.kshot_steps < 1:
    parser.error(f"--kshot_steps must be >= 1, got {args.kshot_steps}")
  extra = {k: grid.parse_value(v) for k, v in _pairs(parser, args.set, "set").items()}
  vary = {k: [grid.parse_value(x) for x in v.split(",")]
          for k, v in _pairs(parser, args.vary, "vary").items()}
  for key, values in vary.items():
    if len(values) < 2 or len(set(map(str, values))) != len(values) or key in extra:
      parser.error(f"--vary {key}: give two or more different values, and not also "
                   f"--set {key}; got {values}")
  checkpoints = _pairs(parser, args.checkpoint, "checkpoint")
  from bitune_jax.training import config_base  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(config_base.expand_path(args.workdir))  # `~` after `=`
  if args.spec:
    if args.methods or args.datasets:
      parser.error("give --spec or an ad-hoc grid (--methods, --datasets), not both")
    try:
      table = tables.load(args.spec)
    except ValueError as e:
      parser.error(str(e))
    cells = grid.cells_from_spec(table, seeds, extra, vary)
  elif args.methods and args.datasets:
    from bitune_jax import methods  # pylint: disable=g-import-not-at-top
    names, datasets = args.methods.split(","), args.datasets.split(",")
    unknown = [m for m in names if m not in methods.METHODS] + [
        d for d in datasets if d not in config_base.DATASETS]
    if unknown:
      parser.error(f"unknown methods or datasets: {unknown}")
    cells = grid.cells_from_grid(names, datasets, rates, args.arch, seeds, extra, vary)
  else:
    parser.error("give --spec, or --methods and --datasets")
  runs = {r for c in cells for r in c.runs}
  for what, keys in (("set", extra), ("vary", vary)):
    for key in keys:  # another method's field: set in that method's runs, if any
      if runs and not any(grid.reads(r.config_file, key) for r in runs):
        first = min(runs, key=lambda r: r.name)
        parser.error(f"--{what} {key}: no run of this sweep reads it: "
                     f"{config_base.foreign_field(first.config_file, key)}")
  if args.print_commands:
    if sweep.source_run(cells, checkpoints) is not None:
      print(sweep.source_command(argv if argv is not None else sys.argv[1:], workdir))
    for run in sorted(runs, key=lambda r: r.name):
      print(sweep.command(run, workdir, checkpoints))
    return 0
  console.setup()
  if args.report:
    return _locked(parser, workdir, lambda: _print_report(workdir, cells, checkpoints))
  needed = sorted({grid.checkpoint_name(r, checkpoints) for r in runs if r.checkpoint}
                  - set(checkpoints) - {"none"})
  if needed:
    parser.error("the spec's runs start from checkpoints not given: "
                 + ", ".join(f"--checkpoint {n}=PATH ({specs.CHECKPOINTS[n.split('@')[0]]})"
                             for n in needed))
  for run in runs:  # every config error before anything trains
    try:
      grid.build_config(run, checkpoints)
    except (ValueError, KeyError) as e:
      parser.error(f"run {run.name}: {e}")
  # A command refused above leaves nothing behind.
  if args.source_only:
    return _locked(parser, workdir, lambda: sweep.make_source(workdir, cells, checkpoints))
  return _locked(parser, workdir, lambda: _run_and_report(workdir, cells, checkpoints,
                                                          args.kshot_steps))


def _print_report(workdir, cells, checkpoints):
  print(sweep.report(workdir, cells, checkpoints), end="")
  return 0


def _run_and_report(workdir, cells, checkpoints, kshot_steps):
  try:
    failures = sweep.run_all(workdir, cells, checkpoints, kshot_steps=kshot_steps)
  except sweep.Interrupted as e:  # SIGINT or SIGTERM: saved, resumable, nothing failed
    print(f"bitune-sweep: {e}", file=sys.stderr)
    return 128 + e.signum
  except KeyboardInterrupt:  # a second Ctrl-C: at once
    print("bitune-sweep: interrupted at once (a second Ctrl-C); the run in progress "
          "resumes from its last checkpoint with the same command", file=sys.stderr)
    return 130
  print(sweep.report(workdir, cells, checkpoints), end="")
  if failures:
    print(f"{len(failures)} runs failed (see {os.path.join(workdir, 'failures.json')})",
          file=sys.stderr)
    return 1
  return 0


def _locked(parser, workdir, body):
  """`body()` holding DIR's lock; a DIR held by another command is refused (exit 2)."""
  from bitune_jax.training import workdir_lock  # pylint: disable=g-import-not-at-top
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
