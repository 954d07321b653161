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
persistent JAX compilation cache lives in `DIR/jax_cache` (or where
`$JAX_COMPILATION_CACHE_DIR` already puts it), so runs after the first of a shape do
not compile again.

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


import json
import logging
import os
import shlex
import signal
import statistics
import sys
import time
import traceback

from bitune_jax.experiments import grid, sweep_results

log = logging.getLogger("bitune_jax")


def _digits_source(workdir, run, checkpoints):
  """The demo's source model (supervised on digits 0-4), pre-trained once for the
  whole sweep in `DIR/source` and shared by its digits runs, instead of once per
  run; `run` is the first run that needs it
  (`source_run`), whose config the pre-training takes its seed and sizes from."""
  from bitune_jax.experiments import demo  # pylint: disable=g-import-not-at-top
  return demo.source_model(grid.build_config(run, checkpoints),
                           os.path.join(workdir, "source"))


def source_file(workdir) -> str:
  """The sweep's shared digits source model (written by `_digits_source`)."""
  from bitune_jax.experiments import demo  # pylint: disable=g-import-not-at-top
  return demo.source_file(os.path.join(workdir, "source"))


def _uses_source(run, checkpoints) -> bool:
  from bitune_jax.experiments import demo  # pylint: disable=g-import-not-at-top
  return not run.checkpoint and (
      grid.build_config(run, checkpoints).init_from == demo.NAME)


def _ordered_runs(cells) -> dict:
  """`{run: the result keys of its cells}`, in the order the sweep runs them."""
  needs = {}
  for cell in cells:
    for run in cell.runs:
      needs.setdefault(run, set()).add(sweep_results.key(cell))
  return needs


def source_run(cells, checkpoints):
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
    config = grid.build_config(run, checkpoints, source_file(workdir))
  except (KeyError, ValueError):
    return {}
  return {k: v for k, v in records.config_changes(config, folder).items()
          if k not in records.RESUMABLE}


def report(workdir, cells, checkpoints) -> str:
  """The results table, without the runs made otherwise than this sweep's."""
  foreign = {r.name for r in _ordered_runs(cells)
             if made_otherwise(workdir, r, checkpoints)}
  return sweep_results.report(workdir, cells, exclude=foreign)


def command(run: grid.Run, workdir, checkpoints) -> str:
  """The `bitune-train` line of `run` (for a cluster's job array): the run the sweep
  makes, from the sweep's shared source model where it uses one (`source_command`
  makes it first)."""
  parts = ["bitune-train", "--config", f"configs/{run.config_file}.py:{run.arg}",
           "--workdir", run.folder(workdir),
           f"--config.seed={run.seed}"]
  if run.checkpoint:
    name = grid.checkpoint_name(run, checkpoints)
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
  from bitune_jax.training import workdir_lock
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
  import jax  # pylint: disable=g-import-not-at-top
  from bitune_jax.training import stopping  # pylint: disable=g-import-not-at-top
  signals = stopping.StopSignals(
      "the sweep stops once the current phase has saved its state")
  signals.install()
  # The persistent compilation cache: one the user set already (its path is part of
  # every cache key, through XLA's autotuning cache, so moving it would compile all
  # again), else the sweep's own. As it was after the sweep.
  cache = jax.config.jax_compilation_cache_dir
  if not cache:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  try:
    return _run_all(workdir, cells, checkpoints, kshot_steps, signals)
  finally:
    signals.restore()
    jax.config.update("jax_compilation_cache_dir", cache)


def _run_all(workdir, cells, checkpoints, kshot_steps, signals):
  from bitune_jax.training import stopping  # pylint: disable=g-import-not-at-top
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
      config = grid.build_config(run, checkpoints)
      if config.init_from == "demo:digits_source":
        source = source or _digits_source(workdir, run, checkpoints)
        _stop_if_asked(signals, "after pre-training the source model")
        config = grid.build_config(run, checkpoints, source)
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
    report(workdir, cells, checkpoints)
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
  report(workdir, cells, checkpoints)


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


def make_source(workdir, cells, checkpoints):
  """`--source_only`: the shared source model as `run_all` makes it."""
  from bitune_jax.training import stopping  # pylint: disable=g-import-not-at-top
  run = source_run(cells, checkpoints)
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
