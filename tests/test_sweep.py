"""`bitune-sweep`: a grid of runs, skipped when finished, failures reported while the
others go on, and the results table (mean ± std over seeds, the paper's number, the
difference) against hand computations."""

import csv
import json
import os
import statistics

import pytest

from bitune_jax import plots, sweep, train

TINY = ["--set", "total_steps=3", "--set", "eval_every=3", "--set", "checkpoint_every=3",
        "--set", "log_every=3", "--set", "pretrain.total_steps=3", "--set",
        "image_size=16", "--set", "batch_size=16"]


def _csv(workdir):
  with open(os.path.join(workdir, "results.csv")) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_grid_runs_skips_finished_runs_and_reports_failures(tmp_path, monkeypatch):
  """2 rates x 2 seeds of vanilla fine-tuning on the digits: one run fails, the others
  go on and the sweep says so; run again, only the failed one trains; the table's mean
  ± std are those of the runs' own summaries."""
  argv = ["--workdir", str(tmp_path), "--methods", "finetune", "--datasets", "digits",
          "--rates", "50,100", "--seeds", "0,1"] + TINY
  real = train.train_and_evaluate
  trained = []

  def flaky(config, workdir):
    if os.path.basename(workdir) == "pretrain":  # the shared source model
      return real(config, workdir)
    trained.append(os.path.basename(workdir))
    if len(trained) == 2 and not os.environ.get("SWEEP_AGAIN"):
      raise RuntimeError("out of memory (on purpose)")
    return real(config, workdir)
  monkeypatch.setattr(train, "train_and_evaluate", flaky)
  assert sweep.main(argv) == 1
  failures = json.loads((tmp_path / "failures.json").read_text())
  assert list(failures) == [trained[1]] and "on purpose" in failures[trained[1]]
  assert len(trained) == 4
  monkeypatch.setenv("SWEEP_AGAIN", "1")
  del trained[:]
  assert sweep.main(argv) == 0
  assert trained == [list(failures)[0]]  # finished runs are not trained again
  assert json.loads((tmp_path / "failures.json").read_text()) == {}
  rows = _csv(tmp_path)
  assert [(r["row"], r["column"], r["seeds"]) for r in rows] == [
      ("finetune", "digits 50%", "2"), ("finetune", "digits 100%", "2")]
  for row, rate in zip(rows, (50, 100)):
    scores = []
    for seed in (0, 1):
      path = tmp_path / "runs" / f"finetune-demo-{_digest(rate)}-seed{seed}" / "summary.json"
      summary = json.loads(path.read_text())
      assert summary["sampling_rate"] == rate and summary["step"] == 3
      scores.append(100 * summary["score"])
    assert float(row["mean"]) == pytest.approx(statistics.mean(scores), abs=1e-4)
    assert float(row["std"]) == pytest.approx(statistics.stdev(scores), abs=1e-4)
    assert row["paper_mean"] == "" and row["difference"] == ""
  text = (tmp_path / "results.md").read_text()
  assert "| finetune | digits 50% |" in text
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
  assert [p.stem for p in curves] == [r.name for r in runs]
  data = plots.training_curves(str(runs[0]), str(tmp_path / "again.png"))
  summary = json.loads((runs[0] / "summary.json").read_text())
  assert data["test"]["test_top1"][-1] == (3, pytest.approx(summary["top1"], abs=1e-6))
  assert [s for s, _ in data["losses"]["loss"]][-1] == 3
  assert "lr/backbone" not in data["losses"]


def _digest(rate):
  overrides = {"sampling_rate": float(rate)}
  for item in TINY[1::2]:
    key, _, value = item.partition("=")
    overrides[key] = sweep._value(value)  # pylint: disable=protected-access
  run = sweep.Run("finetune", "demo", tuple(sorted(overrides.items())), "", 0)
  return run.name.split("-")[-2]


SPEC = '''
from bitune_jax.tables import Column, Row, Table
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
  from bitune_jax import tables  # pylint: disable=g-import-not-at-top
  cells = sweep.cells_from_spec(tables.load(str(spec)), [0, 1, 2], {})
  scores = {("Fine-tuning", "Digits 50%"): [0.91, 0.93, 0.92],
            ("Fine-tuning", "Digits 100%"): [0.95, 0.97],  # seed 2 not run yet
            ("Bi-tuning", "Digits 50%"): [0.9]}
  for cell in cells:
    for run, score in zip(cell.runs, scores[(cell.row, cell.column)]):
      folder = workdir / "runs" / run.name
      folder.mkdir(parents=True, exist_ok=True)
      (folder / "summary.json").write_text(json.dumps({"step": 1, "score": score}))
  assert sweep.main(argv + ["--report"]) == 0
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
    sweep.main(argv)
  assert "--checkpoint supervised_resnet50=PATH" in capsys.readouterr().err


def test_print_commands_one_line_per_run(tmp_path, capsys):
  spec = tmp_path / "table.py"
  spec.write_text(SPEC)
  assert sweep.main(["--workdir", str(tmp_path / "w"), "--spec", str(spec), "--seeds",
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
  assert sweep.main(["--workdir", "w", "--spec", "configs/tables/bituning_table5.py",
                     "--checkpoint", "moco_v1_resnet50=m.npz", "--print_commands"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 20  # 5 loss combinations x 4 rates, one seed
  with pytest.raises(SystemExit):
    sweep.main(["--workdir", "w", "--spec", "configs/tables/no_such_table.py"])
