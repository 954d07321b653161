"""`python -m bitune_jax.compare`, deprecated: the digits grid of `bitune-sweep`, every
method from one source model; a method trained without labels gets the feature
protocols and k-shot transfer."""

import csv
import json
import re

import pytest

from bitune_jax import compare


@pytest.mark.slow
def test_compare_is_the_sweeps_digits_grid(tmp_path, capsys):
  assert compare.main(["--workdir", str(tmp_path), "--methods",
                       "finetune,unsup_finetune", "--total_steps", "4",
                       "--pretrain_steps", "4", "--kshot_steps", "2"]) == 0
  captured = capsys.readouterr()
  assert ("running: bitune-sweep --methods finetune,unsup_finetune --datasets digits "
          "--rates 25 --seeds 0") in captured.err
  # The console: our lines (HH:MM:SS ...) and warnings, no INFO of orbax, clu or absl.
  info = [line for line in captured.err.splitlines()
          if re.match(r"I\d{4} |INFO:", line)]
  assert not info, info[:5]
  ours = [line for line in captured.err.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]
  assert any("step 4/4" in line for line in ours), captured.err[-2000:]
  with open(tmp_path / "results.csv") as f:
    rows = {(r["row"], r["column"]): r for r in csv.DictReader(f)}
  runs = {p.name.split("-")[0]: p for p in (tmp_path / "runs").iterdir()}
  source = str(tmp_path / "source" / "pretrained" / "digits_source.npz")
  results = {}
  for method, folder in runs.items():
    results[method] = json.loads((folder / "summary.json").read_text())
    assert results[method]["step"] == 4 and results[method]["method"] == method
    assert json.loads((folder / "config.json").read_text())["init_from"] == source
  results["unsup_finetune"].update(json.loads(
      (runs["unsup_finetune"] / "sweep_kshot.json").read_text()))
  expected = {("finetune", "digits 25%"): results["finetune"]["score"]}
  for name, key in (("retrieval", "retrieval_top5"),
                    ("bcubed", "kmeans_bcubed_precision"),
                    ("linear probe", "linear_probe_top1")):
    expected[("unsup_finetune", f"digits 25% {name}")] = results["unsup_finetune"][key]
  for k in (1, 2, 4, 8):
    expected[("unsup_finetune", f"digits 25% {k}-shot")] = results["unsup_finetune"][
        f"kshot_{k}_top1"]
  assert set(rows) == set(expected)
  for cell, value in expected.items():
    assert float(rows[cell]["mean"]) == pytest.approx(100 * value, abs=1e-4), cell
  table = captured.out
  assert f"| finetune | {100 * results['finetune']['score']:.2f} (1) |" in table
