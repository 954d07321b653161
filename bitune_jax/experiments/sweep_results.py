"""The results of a sweep: each cell's numbers read from its runs' folders, the
table (`results.md`, `results.csv`) and the figures (`plots/`). Read-only on the runs:
`bitune-sweep --report` regenerates all of it at any time, also while a sweep runs."""

import csv
import io
import json
import os
import statistics

# Where each column's number is read from a run's results (`eval` of `configs.tables.Column`).
_RESULT_KEY = {"": "score", "retrieval": "retrieval_top5",
               "bcubed": "kmeans_bcubed_precision", "linear_probe": "linear_probe_top1"}

# Names of the keys a sensitivity analysis varies (Bi-tuning Figure 2: K and L).
_SHORT = {"bituning.queue_size": "K", "bituning.projector_dim": "L"}
_AXIS = {"bituning.queue_size": "K, keys per class (bituning.queue_size)",
         "bituning.projector_dim": "L, projector dimension (bituning.projector_dim)"}


def short(key):
  return _SHORT.get(key, key)


def results(workdir, run):
  """The run's numbers: its summary (if finished) and k-shot evaluations, or None."""
  folder = run.folder(workdir)
  path = os.path.join(folder, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    out = json.load(f)
  for extra in ("sweep_features.json", "sweep_kshot.json"):
    extra = os.path.join(folder, extra)
    if os.path.exists(extra):
      with open(extra) as f:
        out.update(json.load(f))
  return out


def key(cell):
  """Where `cell`'s number is in a run's results."""
  return f"kshot_{cell.kshot}_top1" if cell.eval == "kshot" else _RESULT_KEY[cell.eval]


def finished(results, config, keys):
  return (results is not None and results.get("step") == config.total_steps
          and all(k in results for k in keys))


def _number(results, cell):
  if results is None:
    return None
  value = results.get(key(cell))
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


def report(workdir, cells, exclude=()) -> str:
  """Writes `results.md` and `results.csv` from the runs that exist, except those named
  in `exclude` (runs made otherwise than the sweep's); returns the Markdown."""
  rows = []
  for cell in cells:
    values = [v for v in (_number(results(workdir, r), cell) for r in cell.runs
                          if r.name not in exclude) if v is not None]
    mean, std = _stats(values)
    paper_mean, paper_std = cell.paper if cell.paper else (None, None)
    diff = None if mean is None or paper_mean is None else mean - paper_mean
    rows.append((cell, mean, std, len(values), paper_mean, paper_std, diff))
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(["table", "row", "column", "mean", "std", "seeds", "paper_mean",
                   "paper_std", "difference"])
  for cell, mean, std, n, pm, ps, diff in rows:
    writer.writerow([cell.table, cell.label, cell.column] + [
        "" if x is None else (f"{x:.4f}" if isinstance(x, float) else x)
        for x in (mean, std, n, pm, ps, diff)])
  lines = []
  for table in dict.fromkeys(cell.table for cell in cells):  # in order
    chosen = [r for r in rows if r[0].table == table]
    lines += ["" if lines else None, f"## {table}", ""]
    if any(r[4] is not None for r in chosen):  # the paper's numbers beside ours
      lines += ["| row | column | ours | seeds | paper | ours - paper |",
                "|---|---|---|---|---|---|"]
      lines += [f"| {c.label} | {c.column} | {_fmt(mean, std)} | {n} | {_fmt(pm, ps)} "
                f"| {'—' if diff is None else f'{diff:+.2f}'} |"
                for c, mean, std, n, pm, ps, diff in chosen]
    else:
      lines += _pivot(chosen)
  text = "\n".join(line for line in lines if line is not None) + "\n"
  write(os.path.join(workdir, "results.csv"), buffer.getvalue())
  write(os.path.join(workdir, "results.md"), text)
  _plots(workdir, cells, rows)
  return text


def _pivot(rows):
  """A table without the paper's numbers, laid out as a paper's: one line per row,
  one column per column, `mean ± std (seeds)`."""
  labels = list(dict.fromkeys(r[0].label for r in rows))
  columns = list(dict.fromkeys(r[0].column for r in rows))
  value = {(c.label, c.column): f"{_fmt(mean, std)} ({n})" if n else "—"
           for c, mean, std, n, *_ in rows}
  return ([f"| row | {' | '.join(columns)} |", "|---|" + "---|" * len(columns)]
          + [f"| {label} | " + " | ".join(value.get((label, col), "") for col in columns)
             + " |" for label in labels]
          + ["", "mean ± sample std over seeds (their number)"])


def _slug(text):
  return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def _plots(workdir, cells, rows):
  """`DIR/plots/<table>.png` (accuracy against the rate or k, the paper's beside it)
  and `DIR/plots/curves/<run>.png` for each finished run without an up-to-date one."""
  from bitune_jax.experiments import plots  # pylint: disable=g-import-not-at-top
  folder = os.path.join(workdir, "plots")
  by_table = {}
  for cell, mean, std, _, pm, ps, _ in rows:
    series = cell.label if cell.eval in ("", "kshot") else f"{cell.label} {cell.eval}"
    by_table.setdefault(cell.table, []).append(
        (cell.dataset, series, cell.x, mean, std, pm, ps))
  for table, points in by_table.items():
    kshot = all(c.kshot for c in cells if c.table == table)
    plots.accuracy_vs_rate(points, os.path.join(folder, f"{_slug(table)}.png"),
                           title=table, metric=_metric(cells, table),
                           xlabel="k, labelled images per class" if kshot
                           else "sampling rate of the training set (%)")
  _sensitivity_plots(folder, rows)
  _curves(workdir, folder, cells)


def _metric(cells, table):
  """The y axis: the table's metric, mean ± std over its seeds."""
  chosen = [c for c in cells if c.table == table]
  seeds = max(len(c.runs) for c in chosen)
  return f"{chosen[0].metric}, mean ± std over {seeds} seeds" if seeds > 1 else (
      chosen[0].metric)


def sensitivity_points(rows, key):
  """`(dataset, series, value of key, mean, std, None, None)` of every cell that
  varies `key`: one series per row, column and the other varied values."""
  points = []
  for cell, mean, std, *_ in rows:
    params = dict(cell.params)
    if key not in params:
      continue
    others = ", ".join(f"{short(k)}={v}" for k, v in cell.params if k != key)
    series = f"{cell.row} {cell.column}" + (f" ({others})" if others else "")
    points.append((cell.dataset, series, float(params[key]), mean, std, None, None))
  return points


def _sensitivity_plots(folder, rows):
  """`plots/sensitivity_<key>.png` for each key the cells vary over two or more values
  (Bi-tuning Figure 2: K and L): the metric against the value, log2 x axis."""
  from bitune_jax.experiments import plots  # pylint: disable=g-import-not-at-top
  keys = sorted({k for cell, *_ in rows for k, _ in cell.params})
  for key in keys:
    points = sensitivity_points(rows, key)
    if len({p[2] for p in points}) < 2:
      continue
    plots.accuracy_vs_rate(
        points, os.path.join(folder, f"sensitivity_{_slug(key)}.png"),
        title=f"sensitivity to {_AXIS.get(key, key)}",
        metric="test metric (%), mean ± std over seeds", xlabel=_AXIS.get(key, key),
        log2_x=all(p[2] > 0 for p in points))


def _curves(workdir, folder, cells):
  from bitune_jax.experiments import plots  # pylint: disable=g-import-not-at-top
  for run in {r for c in cells for r in c.runs if r.config}:  # as-is runs: no curves
    run_dir = run.folder(workdir)
    summary = os.path.join(run_dir, "summary.json")
    target = os.path.join(folder, "curves", f"{run.name}.png")
    if os.path.exists(summary) and (not os.path.exists(target) or os.path.getmtime(
        target) < os.path.getmtime(summary)) and any(
            n.startswith("events.out.tfevents") for n in os.listdir(run_dir)):
      plots.training_curves(run_dir, target, title=run.name)


def write(path, text):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
