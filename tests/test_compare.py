"""The comparison script: every method on the embedded task from one source model."""

import json
import re

import pytest

from bitune_jax import compare


def test_format_table_means_and_spreads():
  rows = {"a": [{"top1": 0.5, "mean_class_acc": 0.25}, {"top1": 0.7, "mean_class_acc": 0.75}],
          "b": [{"top1": 1.0, "mean_class_acc": 0.9}]}
  table = compare.format_table(rows).splitlines()
  # mean 60, sample std of (50, 70) = 14.14; mean 50, std of (25, 75) = 35.36
  assert table[2] == "| a | 2 | 60.00 ± 14.14 | 50.00 ± 35.36 |"
  assert table[3] == "| b | 1 | 100.00 | 90.00 |"
  features = compare.format_table({"u": [{"retrieval_top5": 0.9, "linear_probe_top1": 0.8,
                                          "kmeans_bcubed_precision": 0.7}]}).splitlines()
  assert features[2] == "| u | 1 | 90.00 | 70.00 | 80.00 |"
  shots = {f"kshot_{k}_top1": k / 10 for k in (1, 2, 4, 8)}
  with_shots = compare.format_table({"u": [{"retrieval_top5": 0.9, "linear_probe_top1": 0.8,
                                            "kmeans_bcubed_precision": 0.7, **shots}]})
  assert with_shots.splitlines()[2] == ("| u | 1 | 90.00 | 70.00 | 80.00 | 10.00 | 20.00 |"
                                        " 40.00 | 80.00 |")


@pytest.mark.slow
def test_every_method_runs_from_the_same_source_model(tmp_path, capsys):
  rows = compare.main(["--workdir", str(tmp_path), "--methods",
                       "finetune,bituning,cotuning", "--total_steps", "4",
                       "--pretrain_steps", "4"])
  captured = capsys.readouterr()
  out = captured.out
  # The console: our lines (HH:MM:SS ...) and warnings, no INFO of orbax, clu or absl.
  info = [line for line in captured.err.splitlines()
          if re.match(r"I\d{4} |INFO:", line)]
  assert not info, info[:5]
  ours = [line for line in captured.err.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]
  assert any("step 4/4" in line for line in ours), captured.err[-2000:]
  for method in ("finetune", "bituning", "cotuning"):
    summary = rows[method][0]
    row = (f"| {method} | 1 | {100 * summary['top1']:.2f} | "
           f"{100 * summary['mean_class_acc']:.2f} |")
    assert row in out.splitlines(), (row, out[-2000:])
    assert summary["step"] == 4 and summary["method"] == method
    config = json.load(open(tmp_path / f"{method}_seed0" / "config.json"))
    assert config["init_from"] == str(tmp_path / "source" / "pretrained" /
                                      "digits_source.npz")
  assert (tmp_path / "comparison.md").read_text().startswith("| method |")
