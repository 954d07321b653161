"""`bitune-sweep`: a grid of runs, skipped when finished, failures reported while the
others go on, and the results table (mean ± std over seeds, the paper's number, the
difference) against hand computations."""

import csv
import json
import os
import re
import shutil
import statistics

import pytest

import processes

from bitune_jax import methods
from bitune_jax.cli import sweep as sweep_cli
from bitune_jax.experiments import demo, grid, plots, sweep, sweep_results
from bitune_jax.training import loop

TINY = ["--set", "total_steps=3", "--set", "eval_every=3", "--set", "checkpoint_every=3",
        "--set", "log_every=3", "--set", "pretrain.total_steps=3", "--set",
        "image_size=16", "--set", "batch_size=16"]
# The vanilla fine-tuning runs of this file, and the k-shot transfers (vanilla
# fine-tuning too, `--kshot_steps STEPS`), are one config: a train step per seed (0, 1),
# compiled once for the file through the XLA cache.
STEPS = 20
RUNS = TINY + ["--set", f"total_steps={STEPS}", "--set", f"eval_every={STEPS}", "--set",
               f"checkpoint_every={STEPS}", "--set", f"log_every={STEPS}"]
# The runs that a signal stops: a checkpoint every 5 steps; a signal sent once the one
# of step 5 exists lands 10 steps or more (a second or so) before the end.
SIGNALLED = RUNS + ["--set", "checkpoint_every=5", "--set", "log_every=5"]


def _prepare(workdir, source=None):
  """`workdir` for a sweep; with `source`, the shared source model (`tiny_source`) is
  in its `source/`, as a sweep started again finds its own. (The sweeps compile into
  the session's cache, tests/conftest.py, which `$JAX_COMPILATION_CACHE_DIR` names:
  what one sweep compiled the next reads, in this process or a `bitune-sweep` one.)"""
  os.makedirs(workdir, exist_ok=True)
  if source is not None:
    shutil.copytree(source, os.path.join(workdir, "source"))


@pytest.fixture(scope="module")
def stopped_at_source(tmp_path_factory):
  """A digits sweep at TINY's settings sent SIGTERM during the last step of its source
  model's pre-training: `(exit code, stderr, workdir)`. Its source model, finished,
  is the source of the sweeps below (`tiny_source`)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  from bitune_jax.training import stopping  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp("stopped-at-source")
  _prepare(folder)
  real = stopping.StopSignals.should_stop

  def signal_at_last_step(self, step):
    if step == 3:  # pretrain.total_steps: the last step
      os.kill(os.getpid(), signal.SIGTERM)
    return real(self, step)
  err = io.StringIO()
  with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
    patch.setattr(stopping.StopSignals, "should_stop", signal_at_last_step)
    code = sweep_cli.main(["--workdir", str(folder), "--methods", "finetune", "--datasets",
                           "digits", "--rates", "50", "--seeds", "0"] + TINY)
  return code, err.getvalue(), folder


@pytest.fixture(scope="module")
def tiny_source(stopped_at_source):
  """The digits source model that a sweep at TINY's settings pre-trains first, made
  once for this file (by `stopped_at_source`: a signal at its last step leaves it
  finished). The sweeps below find it in their `source/` folder and go on to their
  runs; the source's own pre-training is tested where it matters (a signal during it,
  the printed `--source_only` line)."""
  return stopped_at_source[2] / "source"


def _csv(workdir):
  with open(os.path.join(workdir, "results.csv")) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_grid_runs_skips_finished_runs_and_reports_failures(tmp_path, monkeypatch,
                                                           tiny_source):
  """2 rates x 2 seeds of vanilla fine-tuning on the digits: one run fails, the others
  go on and the sweep says so; run again, only the failed one trains; the table's mean
  ± std are those of the runs' own summaries."""
  argv = ["--workdir", str(tmp_path), "--methods", "finetune", "--datasets", "digits",
          "--rates", "50,100", "--seeds", "0,1"] + RUNS
  real = loop.train_and_evaluate
  trained = []

  def flaky(config, workdir, sources=None):
    if os.path.basename(workdir) == "pretrain":  # the shared source model
      return real(config, workdir, sources)
    trained.append(os.path.basename(workdir))
    if len(trained) == 2 and not os.environ.get("SWEEP_AGAIN"):
      raise RuntimeError("out of memory (on purpose)")
    return real(config, workdir, sources)
  monkeypatch.setattr(loop, "train_and_evaluate", flaky)
  _prepare(tmp_path, tiny_source)
  assert sweep_cli.main(argv) == 1
  failures = json.loads((tmp_path / "failures.json").read_text())
  assert list(failures) == [trained[1]] and "on purpose" in failures[trained[1]]
  assert len(trained) == 4
  monkeypatch.setenv("SWEEP_AGAIN", "1")
  del trained[:]
  # A finished run in the folder name of an earlier release (no rate): found, kept.
  finished = sorted(set(os.listdir(tmp_path / "runs")) - set(failures))[0]
  assert "-rate50-" in finished or "-rate100-" in finished, finished
  earlier = re.sub(r"-rate\d+-", "-", finished)
  os.rename(tmp_path / "runs" / finished, tmp_path / "runs" / earlier)
  assert sweep_cli.main(argv) == 0
  assert trained == [list(failures)[0]]  # finished runs are not trained again
  assert not (tmp_path / "runs" / finished).exists()
  assert json.loads((tmp_path / "failures.json").read_text()) == {}
  rows = _csv(tmp_path)
  assert [(r["row"], r["column"], r["seeds"]) for r in rows] == [
      ("finetune", "digits 50%", "2"), ("finetune", "digits 100%", "2")]
  for row, rate in zip(rows, (50, 100)):
    scores = []
    for seed in (0, 1):
      name = f"finetune-demo-rate{rate}-{_digest(rate)}-seed{seed}"
      path = tmp_path / "runs" / name / "summary.json"
      if not path.exists():  # the run renamed to an earlier release's name above
        path = tmp_path / "runs" / name.replace(f"-rate{rate}-", "-") / "summary.json"
      summary = json.loads(path.read_text())
      assert summary["sampling_rate"] == rate and summary["step"] == STEPS
      scores.append(100 * summary["score"])
    assert float(row["mean"]) == pytest.approx(statistics.mean(scores), abs=1e-4)
    assert float(row["std"]) == pytest.approx(statistics.stdev(scores), abs=1e-4)
    assert row["paper_mean"] == "" and row["difference"] == ""
  text = (tmp_path / "results.md").read_text()
  assert (f"| finetune | {float(rows[0]['mean']):.2f} ± {float(rows[0]['std']):.2f} (2) | "
          f"{float(rows[1]['mean']):.2f} ± {float(rows[1]['std']):.2f} (2) |") in text
  # One source model (digits 0-4) pre-trained for the whole sweep, every run from it.
  source = str(tmp_path / "source" / "pretrained" / "digits_source.npz")
  runs = sorted((tmp_path / "runs").iterdir())
  assert len(runs) == 4 and os.path.exists(source)
  for run in runs:
    assert json.loads((run / "config.json").read_text())["init_from"] == source
    assert not (run / "pretrain").exists()
  # Plots: the grid's accuracy against the rate, and each run's curves.
  assert (tmp_path / "plots" / "grid.png").read_bytes()[:4] == b"\x89PNG"
  curves = sorted((tmp_path / "plots" / "curves").iterdir())
  assert {p.stem for p in curves} == {r.name for r in runs} - {earlier} | {finished}
  data = plots.training_curves(str(runs[0]), str(tmp_path / "again.png"))
  summary = json.loads((runs[0] / "summary.json").read_text())
  assert data["test"]["test_top1"][-1] == (STEPS,
                                           pytest.approx(summary["top1"], abs=1e-6))
  assert [s for s, _ in data["losses"]["loss"]][-1] == STEPS
  assert "lr/backbone" not in data["losses"] and "test_score" not in data["losses"]


def _extra(argv):
  """The `{key: value}` of `--set KEY=VALUE` arguments, as the sweep reads them."""
  return {k: grid.parse_value(v)  # pylint: disable=protected-access
          for k, _, v in (a.partition("=") for a in argv[1::2])}


def _digest(rate):
  """The digest in the name of a run of `RUNS` at `rate`."""
  overrides = dict(_extra(RUNS), sampling_rate=float(rate))
  run = grid.Run("finetune", "demo", tuple(sorted(overrides.items())), "", 0)
  return run.name.split("-")[-2]


SPEC = '''
from bitune_jax.configs.tables import Column, Row, Table
_C = (Column("Digits 50%", "digits", rate=50), Column("Digits 100%", "digits", rate=100))
TABLE = Table("bi-tuning", 99, "a test table", "top-1 (%)", _C, (
    Row("Fine-tuning", "finetune", "resnet_small", "none",
        {"Digits 50%": (90.0, 0.5), "Digits 100%": (95.5, None)}),
    Row("Bi-tuning", "bituning", "resnet_small", "supervised_resnet50",
        {"Digits 50%": (92.0, 0.25)}, overrides={"bituning.queue_size": 4}),
    Row("DELTA", "delta", "resnet_small", "none", {"Digits 50%": (91.0, 0.1)},
        missing="not implemented"),
))
'''


def test_spec_report_carries_the_papers_numbers_and_differences(tmp_path, capsys):
  """Runs of a spec whose summaries exist (written here): the report's mean ± std,
  seeds, paper number and difference by hand; a row that cannot run is left out; a
  missing run shows as no number."""
  spec = tmp_path / "table.py"
  spec.write_text(SPEC)
  workdir = tmp_path / "sweep"
  argv = ["--workdir", str(workdir), "--spec", str(spec), "--seeds", "0,1,2"]
  from bitune_jax.experiments import tables  # pylint: disable=g-import-not-at-top
  cells = grid.cells_from_spec(tables.load(str(spec)), [0, 1, 2], {})
  scores = {("Fine-tuning", "Digits 50%"): [0.91, 0.93, 0.92],
            ("Fine-tuning", "Digits 100%"): [0.95, 0.97],  # seed 2 not run yet
            ("Bi-tuning", "Digits 50%"): [0.9]}
  for cell in cells:
    for run, score in zip(cell.runs, scores[(cell.row, cell.column)]):
      folder = workdir / "runs" / run.name
      folder.mkdir(parents=True, exist_ok=True)
      (folder / "summary.json").write_text(json.dumps({"step": 1, "score": score}))
  assert sweep_cli.main(argv + ["--report"]) == 0
  out = capsys.readouterr().out
  rows = {(r["row"], r["column"]): r for r in _csv(workdir)}
  assert set(rows) == set(scores)  # DELTA (cannot run) is not a cell
  ft = rows[("Fine-tuning", "Digits 50%")]
  assert float(ft["mean"]) == pytest.approx(92.0) and float(ft["std"]) == pytest.approx(1.0)
  assert (ft["seeds"], ft["paper_mean"], ft["paper_std"]) == ("3", "90.0000", "0.5000")
  assert float(ft["difference"]) == pytest.approx(2.0)
  ft100 = rows[("Fine-tuning", "Digits 100%")]
  assert ft100["seeds"] == "2" and float(ft100["difference"]) == pytest.approx(0.5)
  bt = rows[("Bi-tuning", "Digits 50%")]
  assert (bt["seeds"], bt["std"]) == ("1", "") and float(bt["difference"]) == pytest.approx(-2.0)
  assert "| Fine-tuning | Digits 50% | 92.00 ± 1.00 | 3 | 90.00 ± 0.50 | +2.00 |" in out
  assert "| Bi-tuning | Digits 50% | 90.00 | 1 | 92.00 ± 0.25 | -2.00 |" in out
  assert (workdir / "plots" / "bi_tuning_table_99.png").read_bytes()[:4] == b"\x89PNG"
  # Training would need the Bi-tuning row's checkpoint: named, before anything runs.
  with pytest.raises(SystemExit):
    sweep_cli.main(argv)
  assert "--checkpoint supervised_resnet50=PATH" in capsys.readouterr().err


def test_print_commands_one_line_per_run(tmp_path, capsys):
  spec = tmp_path / "table.py"
  spec.write_text(SPEC)
  assert sweep_cli.main(["--workdir", str(tmp_path / "w"), "--spec", str(spec), "--seeds",
                     "0,1", "--checkpoint", "supervised_resnet50=/ckpt/r50.npz",
                     "--set", "data.crop_scale=[0.5, 1.0]", "--print_commands"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 6  # (2 fine-tuning columns + 1 Bi-tuning) x 2 seeds
  bituning = [line for line in lines if "bituning.py" in line]
  assert len(bituning) == 2 and all("--config.init_from=/ckpt/r50.npz" in line
                                    and "--config.bituning.queue_size=4" in line
                                    for line in bituning)
  assert all(line.startswith("bitune-train --config configs/") for line in lines)
  assert sorted(line.split("--config.seed=")[1].split()[0] for line in lines) == [
      "0", "0", "0", "1", "1", "1"]


def test_accuracy_against_rate_draws_ours_and_the_papers(tmp_path):
  points = [("cub", "Bi-tuning", 50.0, 70.0, 1.0, 66.9, 0.1),
            ("cub", "Bi-tuning", 25.0, 50.0, None, 47.7, 0.4),
            ("cub", "CE", 25.0, None, None, 38.6, 0.1),  # not run yet: the paper's only
            ("cars", "CE", 100.0, 80.0, 0.5, None, None)]
  path = tmp_path / "p" / "rates.png"
  data = plots.accuracy_vs_rate(points, str(path), title="t", metric="top-1 (%)")
  assert data == {"cub": {"Bi-tuning": [(25.0, 50.0, None, 47.7, 0.4),
                                        (50.0, 70.0, 1.0, 66.9, 0.1)],
                          "CE": [(25.0, None, None, 38.6, 0.1)]},
                  "cars": {"CE": [(100.0, 80.0, 0.5, None, None)]}}
  assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000


def test_a_shipped_spec_runs_from_any_directory(tmp_path, monkeypatch, capsys):
  """`--spec configs/tables/X.py` where there is no such file (an installed wheel, or
  another directory) is the shipped spec."""
  monkeypatch.chdir(tmp_path)
  assert sweep_cli.main(["--workdir", "w", "--spec", "configs/tables/bituning_table5.py",
                     "--checkpoint", "moco_v1_resnet50=m.npz", "--print_commands"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 20  # 5 loss combinations x 4 rates, one seed
  with pytest.raises(SystemExit):
    sweep_cli.main(["--workdir", "w", "--spec", "configs/tables/no_such_table.py"])


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_runs(tmp_path, monkeypatch,
                                                               tiny_source):
  """`kill -9` of a real `bitune-sweep` process while its second run trains: started
  again, the finished run is not trained again (its summary untouched), the killed one
  resumes from its last checkpoint, and the table has every seed. (The first run is
  finished, curves drawn, by a sweep of seed 0 alone before: the process then reads no
  TensorBoard events, whose reader imports TensorFlow, 6 s of CPU.)"""
  import signal  # pylint: disable=g-import-not-at-top
  argv = ["--workdir", str(tmp_path), "--methods", "finetune", "--datasets", "digits",
          "--rates", "50"] + SIGNALLED
  cells = grid.cells_from_grid(["finetune"], ["digits"], [50.0], "", [0, 1],
                                _extra(SIGNALLED))
  first, second = (tmp_path / "runs" / r.name for r in cells[0].runs)
  _prepare(tmp_path, tiny_source)
  assert sweep_cli.main(argv + ["--seeds", "0"]) == 0
  finished = (first / "summary.json").stat().st_mtime_ns
  argv += ["--seeds", "0,1"]
  proc, log = _start_sweep(tmp_path, argv)
  # The second run's first checkpoint, and on it goes: killed 15 steps before its end.
  code = _signal_when(proc, log, second / "checkpoints" / "5", signal.SIGKILL, tmp_path)
  assert code == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
  assert not (second / "summary.json").exists()
  assert (first / "summary.json").stat().st_mtime_ns == finished
  real, trained = loop.train_and_evaluate, []

  def recorded(config, workdir, sources=None):
    trained.append(os.path.basename(workdir))
    return real(config, workdir, sources)
  monkeypatch.setattr(loop, "train_and_evaluate", recorded)
  assert sweep_cli.main(argv) == 0
  assert trained == [second.name]  # the finished run: not trained again
  assert (first / "summary.json").stat().st_mtime_ns == finished
  launches = sorted((second / "launches").iterdir())
  resumed_at = json.loads(launches[-1].read_text())["start_step"]
  assert len(launches) == 2 and resumed_at >= 5 and resumed_at % 5 == 0
  summary = json.loads((second / "summary.json").read_text())
  assert summary["step"] == STEPS
  row = _csv(tmp_path)[0]
  assert row["seeds"] == "2"
  assert float(row["mean"]) == pytest.approx(statistics.mean(
      100 * json.loads((f / "summary.json").read_text())["score"]
      for f in (first, second)), abs=1e-4)


AS_IS_SPEC = '''
from bitune_jax.configs.tables import Column, Row, Table
_C = (Column("retrieval", "digits", rate=100, eval="retrieval"),
      Column("2-shot", "digits", kshot=2, eval="kshot"))
TABLE = Table("", 0, "as is", "top-5 retrieval / 2-shot top-1 (%)", _C, (
    Row("source model as it is", "", "resnet_small", "", {}),
))
'''


@pytest.mark.slow
def test_a_checkpoint_evaluated_as_it_is(tmp_path, tiny_source):
  """A spec row without a method (e.g. "Unsup-S"): the pre-trained checkpoint itself,
  not trained: its step-0 checkpoint holds the source model's weights unchanged, the
  retrieval number is a NumPy top-5 on the source model's own features, and the k-shot
  column comes from a k-shot transfer of it."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bitune_jax import convert, models  # pylint: disable=g-import-not-at-top
  from bitune_jax.experiments import tables  # pylint: disable=g-import-not-at-top
  from bitune_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from bitune_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
  spec = tmp_path / "as_is.py"
  spec.write_text(AS_IS_SPEC)
  workdir = tmp_path / "sweep"
  argv = ["--workdir", str(workdir), "--spec", str(spec), "--kshot_steps",
          str(STEPS)] + TINY
  _prepare(workdir, tiny_source)
  assert sweep_cli.main(argv) == 0
  (run,) = {r for c in grid.cells_from_spec(tables.load(str(spec)), [0], _extra(TINY))
            for r in c.runs}  # one run: both columns read it
  folder = workdir / "runs" / run.name
  assert run.name.startswith("as_is-demo-")
  assert json.loads((folder / "summary.json").read_text())["step"] == 0
  source = convert.load_converted(str(workdir / "source" / "pretrained" /
                                      "digits_source.npz"))
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(json.loads((folder / "config.json").read_text()))
  ckpts = checkpoint.Checkpoints(str(folder))
  try:
    assert ckpts.latest_step() == 0
  finally:
    ckpts.close()
  # The source model's features, by hand: its variables straight from the file.
  data = input_lib.load(config, methods.data_needs(config))
  backbone = models.create_backbone(config.arch)
  # One program for the forward pass, not a compilation per operation as it runs.
  apply = jax.jit(lambda variables, images: backbone.apply(variables, images,
                                                           train=False))

  def features(split):
    out, labels = [], []
    for batch in split.batches(64):
      keep = np.asarray(batch["mask"]) > 0
      f = apply(source["backbone"], jax.numpy.asarray(batch["image"]))
      out.append(np.asarray(f)[keep])
      labels.append(np.asarray(batch["label"])[keep])
    return np.concatenate(out).astype(np.float64), np.concatenate(labels)
  (train_f, train_y), (test_f, test_y) = features(data.train), features(data.test)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  nearest = np.argsort(-unit(test_f) @ unit(train_f).T, axis=1)[:, :5]
  expected = 100 * np.mean([y in train_y[n] for y, n in zip(test_y, nearest)])
  rows = {r["column"]: r for r in _csv(workdir)}
  assert float(rows["retrieval"]["mean"]) == pytest.approx(expected, abs=1e-3)
  kshot = json.loads((folder / "sweep_kshot.json").read_text())
  assert float(rows["2-shot"]["mean"]) == pytest.approx(100 * kshot["kshot_2_top1"],
                                                        abs=1e-3)
  assert not (workdir / "plots" / "curves").exists() or not any(
      (workdir / "plots" / "curves").iterdir())  # no training, no curves


def test_vary_makes_one_cell_per_value_and_draws_the_sensitivity(tmp_path, capsys):
  """`--vary bituning.queue_size=2,8` with 2 rates: 4 cells, each value in its runs'
  config; with summaries written here, the report and the K sensitivity plot's data
  carry each cell's mean, against K."""
  argv = ["--workdir", str(tmp_path), "--methods", "bituning", "--datasets", "digits",
          "--rates", "25,100", "--seeds", "0,1", "--vary", "bituning.queue_size=2,8"]
  assert sweep_cli.main(argv + ["--print_commands"]) == 0
  source, *lines = capsys.readouterr().out.splitlines()  # first: the shared source
  assert source.startswith("bitune-sweep ") and source.endswith(" --source_only")
  assert len(lines) == 8 and sum("--config.bituning.queue_size=8" in l for l in lines) == 4
  cells = grid.cells_from_grid(["bituning"], ["digits"], [25.0, 100.0], "", [0, 1], {},
                                {"bituning.queue_size": [2, 8]})
  assert [(c.column, c.params) for c in cells] == [
      ("digits 25%", (("bituning.queue_size", 2),)),
      ("digits 25%", (("bituning.queue_size", 8),)),
      ("digits 100%", (("bituning.queue_size", 2),)),
      ("digits 100%", (("bituning.queue_size", 8),))]
  scores = {}
  for i, cell in enumerate(cells):
    for j, run in enumerate(cell.runs):
      assert grid.build_config(run, {}).bituning.queue_size == dict(cell.params)[
          "bituning.queue_size"]
      folder = tmp_path / "runs" / run.name
      folder.mkdir(parents=True)
      score = 0.5 + 0.1 * i + 0.02 * j
      scores.setdefault(cell.label + cell.column, []).append(100 * score)
      (folder / "summary.json").write_text(json.dumps({"step": 300, "score": score}))
  assert sweep_cli.main(argv + ["--report"]) == 0
  out = capsys.readouterr().out
  # No paper numbers: one line per row, one column per rate, as a paper lays it out.
  assert "| row | digits 25% | digits 100% |" in out
  assert "| bituning (K=8) | 61.00 ± 1.41 (2) | 81.00 ± 1.41 (2) |" in out
  rows = [(c, statistics.mean(scores[c.label + c.column]),
           statistics.stdev(scores[c.label + c.column]), 2, None, None, None)
          for c in cells]
  points = sweep_results.sensitivity_points(rows, "bituning.queue_size")
  assert sorted((p[1], p[2], round(p[3], 6)) for p in points) == [
      ("bituning digits 100%", 2.0, 71.0), ("bituning digits 100%", 8.0, 81.0),
      ("bituning digits 25%", 2.0, 51.0), ("bituning digits 25%", 8.0, 61.0)]
  data = plots.accuracy_vs_rate(points, str(tmp_path / "k.png"), title="K", metric="%",
                                xlabel="K", log2_x=True)
  assert data["digits"]["bituning digits 25%"][1][:2] == (8.0, pytest.approx(61.0))
  png = tmp_path / "plots" / "sensitivity_bituning_queue_size.png"
  assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
  with pytest.raises(SystemExit):  # one value is not a sensitivity
    sweep_cli.main(argv[:-1] + ["bituning.queue_size=2", "--print_commands"])


def test_the_digits_spec_is_the_readme_grid(capsys):
  """`--spec configs/tables/digits.py`: vanilla, Bi-tuning and Co-Tuning at 3 rates,
  each the method's demo config at that rate, from the shared source model."""
  from bitune_jax.experiments import tables  # pylint: disable=g-import-not-at-top
  cells = grid.cells_from_spec(tables.load("configs/tables/digits.py"), [0, 1], {})
  assert [(c.row, c.column) for c in cells][:3] == [
      ("vanilla fine-tuning", "digits 25%"), ("vanilla fine-tuning", "digits 50%"),
      ("vanilla fine-tuning", "digits 100%")]
  assert len(cells) == 9 and len({r for c in cells for r in c.runs}) == 18
  for cell in cells:
    config = grid.build_config(cell.runs[1], {})
    assert (config.method, config.sampling_rate, config.seed, config.init_from) == (
        {"vanilla fine-tuning": "finetune", "Bi-tuning": "bituning",
         "Co-Tuning": "cotuning"}[cell.row], cell.x, 1, "demo:digits_source")
    assert config.total_steps == 300


def test_a_checkpoint_given_per_dataset(tmp_path, capsys):
  """Unsupervised fine-tuning Table 5's "+ Our Unsupft-T" starts FixMatch from each
  dataset's own unsup_finetune model: `--checkpoint unsupft_resnet50@pets=FILE`; a
  dataset without one is named before anything runs."""
  argv = ["--workdir", str(tmp_path), "--spec", "configs/tables/unsup_table5.py",
          "--checkpoint", "moco_v2_resnet50=m.npz"]
  for dataset in ("caltech101", "pets", "cifar100", "food101"):
    argv += ["--checkpoint", f"unsupft_resnet50@{dataset}={dataset}.npz"]
  assert sweep_cli.main(argv + ["--print_commands"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 24  # 2 rows x 4 datasets x 3 k
  for line in lines:
    dataset = line.split(":")[1].split(",")[0]
    init = line.split("--config.init_from=")[1].split()[0]
    assert init == (f"{dataset}.npz" if "unsupft" in line else "m.npz"), line
    assert "configs/fixmatch.py" in line and "--config.data.kshot=" in line
  with pytest.raises(SystemExit):
    sweep_cli.main(argv[:-2])  # food101's is missing
  assert "--checkpoint unsupft_resnet50@food101=PATH" in capsys.readouterr().err


def test_a_refused_sweep_leaves_no_folder(tmp_path, capsys):
  workdir = tmp_path / "sweep"
  with pytest.raises(SystemExit):
    sweep_cli.main(["--workdir", str(workdir), "--methods", "bituning", "--datasets",
                "digits", "--set", "bituning.queue_sise=4"])
  assert "unknown config field 'bituning.queue_sise'" in capsys.readouterr().err
  assert not workdir.exists()


def test_a_methods_own_field_goes_to_that_methods_runs(tmp_path, capsys):
  """`--set` / `--vary` of a field in Bi-tuning's section, in a grid that also has
  vanilla fine-tuning: Bi-tuning's runs get it (once per value), vanilla fine-tuning's
  config has no such field and its runs are made once; a field no run of the sweep
  has is refused naming the method that reads it, leaving nothing behind."""
  workdir = tmp_path / "sweep"
  argv = ["--workdir", str(workdir), "--methods", "finetune,bituning", "--datasets",
          "digits", "--rates", "50", "--set", "bituning.ccl_weight=0.5", "--vary",
          "bituning.queue_size=2,8"]
  assert sweep_cli.main(argv + ["--print_commands"]) == 0
  lines = capsys.readouterr().out.splitlines()[1:]  # (the first: the shared source)
  finetune = [line for line in lines if "configs/finetune.py" in line]
  bituning = [line for line in lines if "configs/bituning.py" in line]
  assert len(finetune) == 1 and "bituning." not in finetune[0], finetune
  assert len(bituning) == 2 and all("--config.bituning.ccl_weight=0.5" in line
                                    for line in bituning), bituning
  assert sorted(line.split("--config.bituning.queue_size=")[1].split()[0]
                for line in bituning) == ["2", "8"]
  cells = grid.cells_from_grid(["finetune", "bituning"], ["digits"], [50.0], "", [0],
                                {}, {"bituning.queue_size": [2, 8]})
  assert [(c.row, c.params) for c in cells] == [
      ("finetune", ()), ("bituning", (("bituning.queue_size", 2),)),
      ("bituning", (("bituning.queue_size", 8),))]
  with pytest.raises(SystemExit):
    sweep_cli.main(["--workdir", str(workdir), "--methods", "finetune", "--datasets",
                "digits", "--set", "bituning.queue_size=4"])
  assert capsys.readouterr().err.splitlines()[-1] == (
      "bitune-sweep: error: --set bituning.queue_size: no run of this sweep reads it: "
      "config field 'bituning.queue_size' belongs to bituning (configs/bituning.py); "
      "this config is finetune's, which has no 'bituning' section")
  assert not workdir.exists()


def _start_sweep(tmp_path, argv):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = processes.environment(8, JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES="none")
  log = open(tmp_path / "first.log", "w")
  proc = subprocess.Popen([sys.executable, "-m", "bitune_jax.cli.sweep"] + argv,
                          stdout=log, stderr=subprocess.STDOUT, env=env)
  return proc, log


def _signal_when(proc, log, path, signum, tmp_path):
  """Sends `signum` to the sweep once `path` exists; returns its exit code."""
  import time  # pylint: disable=g-import-not-at-top
  try:
    end = time.time() + 300
    while not path.is_dir():
      assert proc.poll() is None and time.time() < end, (
          (tmp_path / "first.log").read_text()[-3000:])
      time.sleep(0.05)
    proc.send_signal(signum)
    return proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_the_next_sweep_resumes(tmp_path, monkeypatch,
                                                           tiny_source):
  """SIGINT (Ctrl-C) to a real `bitune-sweep` while its first run trains: the run
  saves its step, the sweep exits 130 without starting the second run and records no
  failure; started again, the run resumes at that step. (SIGTERM: the next test.)"""
  import signal  # pylint: disable=g-import-not-at-top
  signum, signame = signal.SIGINT, "SIGINT"
  argv = ["--workdir", str(tmp_path), "--methods", "finetune", "--datasets", "digits",
          "--rates", "50"] + SIGNALLED
  cells = grid.cells_from_grid(["finetune"], ["digits"], [50.0], "", [0, 1],
                                _extra(SIGNALLED))
  first, second = (tmp_path / "runs" / r.name for r in cells[0].runs)
  _prepare(tmp_path, tiny_source)
  proc, log = _start_sweep(tmp_path, argv + ["--seeds", "0,1"])
  code = _signal_when(proc, log, first / "checkpoints" / "5", signum, tmp_path)
  text = (tmp_path / "first.log").read_text()
  assert code == 128 + signum, text[-3000:]
  assert f"stopped by {signame}" in text and "Traceback" not in text, text[-3000:]
  assert "Ctrl-C (SIGINT): stopping after the current step" in text, text[-3000:]
  assert json.loads((tmp_path / "failures.json").read_text()) == {}
  assert not (first / "summary.json").exists() and not second.exists()
  saved = max(int(p.name) for p in (first / "checkpoints").iterdir() if p.name.isdigit())
  assert 5 <= saved < STEPS
  real, trained = loop.train_and_evaluate, []

  def recorded(config, workdir, sources=None):
    trained.append(os.path.basename(workdir))
    return real(config, workdir, sources)
  monkeypatch.setattr(loop, "train_and_evaluate", recorded)
  assert sweep_cli.main(argv + ["--seeds", "0"]) == 0  # (seed 1's run: the same code)
  assert trained == [first.name]
  launches = sorted((first / "launches").iterdir())
  assert len(launches) == 2
  assert json.loads(launches[-1].read_text())["start_step"] == saved
  assert json.loads((first / "summary.json").read_text())["step"] == STEPS
  assert _csv(tmp_path)[0]["seeds"] == "1"


@pytest.mark.slow
def test_a_signal_at_the_last_step_of_the_source_stops_the_sweep(stopped_at_source):
  """A signal during the last step of the source pre-training (no longer ignored): the
  source is finished and kept, and the sweep stops there (143) instead of going on; a
  signal in any earlier step stops the pre-training as it stops a run's training.
  (The sweep is `stopped_at_source`'s: its source model is the other sweeps' too.)"""
  code, err, workdir = stopped_at_source
  assert code == 143, err[-3000:]
  assert "SIGTERM: stopping after the current step" in err and "Ctrl-C" not in err
  assert "bitune-sweep: stopped by SIGTERM after pre-training the source" in err
  assert (workdir / "source" / "pretrained" / "digits_source.npz").exists()
  assert not (workdir / "runs").exists()
  assert json.loads((workdir / "failures.json").read_text()) == {}


def test_printed_commands_are_the_sweeps_runs(tmp_path, capsys, monkeypatch):
  """`--print_commands`: first the line that pre-trains the sweep's shared source model
  (the sweep's own arguments, `--source_only`), then each run from that source. Run
  (without training: the trainers record what they are given), they make the runs
  the sweep makes, which the sweep counts as its own; a run of the same name made
  from another source (as printed commands made before) is neither counted nor
  trained on: the sweep refuses it and says so."""
  import sys  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from bitune_jax.cli import train as train_cli  # pylint: disable=g-import-not-at-top
  argv = ["--workdir", str(tmp_path), "--methods", "finetune", "--datasets", "digits",
          "--rates", "50", "--seeds", "1,0"] + TINY
  assert sweep_cli.main(argv + ["--print_commands"]) == 0
  first, *lines = capsys.readouterr().out.splitlines()
  source = sweep.source_file(str(tmp_path))
  assert first.startswith("bitune-sweep --workdir") and first.endswith("--source_only")
  assert len(lines) == 2 and all(f"--config.init_from={source} " in line
                                 for line in lines)
  made = {"source": [], "runs": {}}

  def pretrain(config, workdir):  # records the source it would pre-train
    made["source"].append((str(config), workdir))
    path = demo.source_file(workdir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()
    return path

  def fake_train(config, workdir, sources=None):  # records the run, writes training's
    del sources
    made["runs"].setdefault(os.path.basename(workdir), []).append(str(config))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    summary = {"step": config.total_steps, "score": 0.5}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)
    return None, summary
  monkeypatch.setattr(demo, "source_model", pretrain)
  monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
  import shlex  # pylint: disable=g-import-not-at-top
  assert sweep_cli.main(shlex.split(first)[1:]) == 0  # the printed source line
  assert sweep_cli.main(argv) == 0  # the sweep
  assert len(made["source"]) == 2 and made["source"][0] == made["source"][1]
  assert made["source"][0][1] == str(tmp_path / "source")
  # Each printed bitune-train line builds the config the sweep trained the run with
  # (bitune-train's command line, run in this process as tests/test_cli_train.py runs it).
  def fresh_flags():
    flags.FLAGS.unparse_flags()  # nothing kept from the last command line
    for flag in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, flag)  # the overrides' flags, defined by each parse anew
  capsys.readouterr()  # (what the sweeps above printed)
  for line in lines:
    args = shlex.split(line)
    name = os.path.basename(args[args.index("--workdir") + 1])
    fresh_flags()
    monkeypatch.setattr(sys, "argv", args + ["--print_config"])
    with pytest.raises(SystemExit) as exited:
      train_cli.run()
    printed = capsys.readouterr()
    assert not exited.value.code, printed.err[-2000:]
    assert made["runs"][name] == [printed.out]
  fresh_flags()
  rows = _csv(tmp_path)
  assert rows[0]["seeds"] == "2"
  # A run of the sweep's name made from its own source: not counted, not trained on.
  other = tmp_path / "runs" / sorted(made["runs"])[0] / "config.json"
  recorded = json.loads(other.read_text())
  recorded["init_from"] = "demo:digits_source"
  other.write_text(json.dumps(recorded))
  assert sweep_cli.main(argv + ["--report"]) == 0
  assert _csv(tmp_path)[0]["seeds"] == "1"
  made["runs"].clear()
  assert sweep_cli.main(argv) == 1
  assert made["runs"] == {}
  failures = json.loads((tmp_path / "failures.json").read_text())
  assert list(failures) == [other.parent.name]
  assert "made otherwise" in failures[other.parent.name]
  assert "init_from='demo:digits_source'" in failures[other.parent.name]
  assert _csv(tmp_path)[0]["seeds"] == "1"


@pytest.mark.slow
def test_a_method_without_labels_gets_the_feature_protocols_and_kshot(tmp_path, capsys,
                                                                       tiny_source):
  """Unsupervised fine-tuning in a digits sweep: its cells are the feature protocols and
  k-shot transfer of its own run, from the sweep's shared source model; the console has
  our progress lines and no INFO of orbax, clu or absl. (Its run trains with vanilla
  fine-tuning's views, schedule and weight decay, which its k-shot transfers take: they
  are then the file's other vanilla fine-tuning runs, compiled once; and on all the
  training images, as `test_a_checkpoint_evaluated_as_it_is`'s feature protocols.)"""
  argv = ["--workdir", str(tmp_path), "--methods", "unsup_finetune", "--datasets",
          "digits", "--rates", "100", "--seeds", "0", "--kshot_steps", str(STEPS),
          "--set", "data.views=reference", "--set", "schedule=step", "--set",
          "weight_decay=0.0005"] + TINY
  _prepare(tmp_path, tiny_source)
  assert sweep_cli.main(argv) == 0
  captured = capsys.readouterr()
  info = [line for line in captured.err.splitlines() if re.match(r"I\d{4} |INFO:", line)]
  assert not info, info[:5]
  ours = [line for line in captured.err.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]
  assert any("step 3/3" in line for line in ours), captured.err[-2000:]
  (folder,) = (tmp_path / "runs").iterdir()
  summary = json.loads((folder / "summary.json").read_text())
  assert summary["step"] == 3 and summary["method"] == "unsup_finetune"
  source = str(tmp_path / "source" / "pretrained" / "digits_source.npz")
  assert json.loads((folder / "config.json").read_text())["init_from"] == source
  results = {**summary, **json.loads((folder / "sweep_kshot.json").read_text())}
  expected = {f"digits 100% {name}": results[key] for name, key in (
      ("retrieval", "retrieval_top5"), ("bcubed", "kmeans_bcubed_precision"),
      ("linear probe", "linear_probe_top1"))}
  expected.update({f"digits 100% {k}-shot": results[f"kshot_{k}_top1"]
                   for k in (1, 2, 4, 8)})
  rows = {r["column"]: r for r in _csv(tmp_path)}
  assert set(rows) == set(expected)
  for column, value in expected.items():
    assert float(rows[column]["mean"]) == pytest.approx(100 * value, abs=1e-4), column


def test_help_says_every_flag_once_with_its_default(capsys):
  with pytest.raises(SystemExit):
    sweep_cli.main(["--help"])
  text = capsys.readouterr().out
  assert text.count(sweep.__doc__.splitlines()[0]) == 1  # the summary once
  parser, _ = sweep_cli._parse(["--workdir", "x"])  # pylint: disable=protected-access
  for action in parser._actions:  # pylint: disable=protected-access
    assert action.help and action.help.strip(), action.option_strings
  options = " ".join(text.split("options:")[1].split())
  for flag, default in (("--rates", "100"), ("--seeds", "0"), ("--kshot_steps", "100"),
                        ("--arch", "resnet50")):
    said = options.split(f" {flag} ", 1)[1].split(" --")[0]
    assert f"(default: {default})" in said, (flag, said)


def test_a_sweep_compiles_into_its_own_cache_unless_one_is_set(tmp_path, monkeypatch):
  """Without a persistent compilation cache, a sweep makes `DIR/jax_cache` its cache;
  one already set (`$JAX_COMPILATION_CACHE_DIR`: its path is in every cache key) is
  kept. Either way the setting is as it was after the sweep."""
  import jax  # pylint: disable=g-import-not-at-top
  seen = []
  monkeypatch.setattr(sweep, "_run_all", lambda *args: seen.append(
      jax.config.jax_compilation_cache_dir) or {})
  session = jax.config.jax_compilation_cache_dir
  assert session == os.environ["JAX_COMPILATION_CACHE_DIR"]
  assert sweep.run_all(str(tmp_path), {}, {}) == {}
  assert seen == [session] and jax.config.jax_compilation_cache_dir == session
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    sweep.run_all(str(tmp_path), {}, {})
    assert seen[-1] == os.path.join(str(tmp_path), "jax_cache")
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update("jax_compilation_cache_dir", session)
