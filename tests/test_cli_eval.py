"""`bitune-eval` on a workdir: the run's own numbers back, plus the feature protocols."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import fakes
import outside
import processes
from bitune_jax import methods
from bitune_jax.cli import eval as eval_cli
from bitune_jax.data import input as input_lib
from bitune_jax.data import splits
from bitune_jax.data.spec import Needs
from bitune_jax.experiments import protocols
from bitune_jax.training import loop

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
import finetune as finetune_config  # noqa: E402  pylint: disable=g-import-not-at-top


def test_evaluates_a_workdir_checkpoint(tmp_path, capsys, monkeypatch):
  """`bitune-eval --workdir W --tsne` on a 6-step finetune run (fakes.tiny_config's, as
  test_export.py's: one compiled run for both files): the run's own step, top-1 and
  mean per-class accuracy, the same as counted from outside (the final state's
  eval-mode outputs on exactly the training and test images, one test image of slack
  for float near-ties), and the feature protocols recomputed from those outputs; the
  record in evals/. The t-SNE draws the test split's points under the digits' class
  names and keeps the neighbourhoods of the test features (trustworthiness > 0.85).
  `--which best`: a checkpoint of an evaluation (step 3 or 6) that scored at least
  the latest."""
  from sklearn.manifold import trustworthiness  # pylint: disable=g-import-not-at-top
  from bitune_jax.experiments import plots  # pylint: disable=g-import-not-at-top
  config = fakes.tiny_config("finetune")
  state, summary = loop.train_and_evaluate(config, str(tmp_path))
  drawn, real_tsne = [], plots.tsne  # what the command drew

  def tsne(*args, **kwargs):  # the real t-SNE; its keywords and what it returned kept
    drawn.append((kwargs, real_tsne(*args, **kwargs)))
    return drawn[-1][1]
  monkeypatch.setattr(plots, "tsne", tsne)
  assert eval_cli.main(["--workdir", str(tmp_path), "--tsne"]) == 0
  metrics = json.loads(capsys.readouterr().out)
  assert metrics["step"] == 6
  assert metrics["top1"] == pytest.approx(summary["top1"])
  assert metrics["mean_class_acc"] == pytest.approx(summary["mean_class_acc"])
  # The numbers from outside: the final state's eval-mode outputs on exactly the
  # training and test images.
  data = input_lib.load(config, methods.data_needs(config))
  model = methods.get("finetune").build_model(config, 5)
  train_out, test_out = (
      outside.eval_outputs(model, state.params, state.batch_stats, outside.eval_images(split))
      for split in (data.train, data.test))
  top1, mean_class = outside.top1_and_mean_class(test_out["logits"], data.test.labels)
  assert metrics["top1"] == pytest.approx(top1, abs=1.01 / len(data.test.labels))
  assert metrics["mean_class_acc"] == pytest.approx(mean_class, abs=0.01)
  outside.check_feature_metrics(
      metrics, (train_out["features"], data.train.labels),
      (test_out["features"], data.test.labels), num_classes=5)
  assert json.load(open(tmp_path / "evals" / "latest-step6.json")) == metrics
  # --tsne: the test features drawn; the embedding keeps their neighbourhoods.
  assert metrics["tsne"] == str(tmp_path / "plots" / "tsne-latest-step6.png")
  assert open(metrics["tsne"], "rb").read(4) == b"\x89PNG"
  (asked, (embedding, labels)), = drawn
  assert asked["class_names"] == ["5", "6", "7", "8", "9"]  # the legend's names
  with np.load(metrics["tsne"][:-4] + ".npz") as saved:  # the points drawn: the test split's
    assert list(saved["labels"]) == list(labels) == list(data.test.labels)
    assert saved["embedding"].shape == (len(data.test.labels), 2)
    np.testing.assert_array_equal(saved["embedding"], embedding)
  assert trustworthiness(test_out["features"], embedding, n_neighbors=5) > 0.85
  assert eval_cli.main(["--workdir", str(tmp_path), "--which", "best"]) == 0
  best = json.loads(capsys.readouterr().out)
  assert best["checkpoint"] == "best-on-test"
  assert best["step"] in (3, 6) and best["top1"] >= metrics["top1"] - 1e-9


def test_refuses_a_folder_that_is_not_a_workdir(tmp_path, capsys):
  with pytest.raises(SystemExit, match="2") as info:
    eval_cli.main(["--workdir", str(tmp_path)])
  assert info.value.code == 2
  assert capsys.readouterr().err == (
      f"bitune-eval: error: {tmp_path} has no config.json: not a bitune-train workdir\n")


def test_kshot_subset_by_hand():
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
  for shots in (1, 2):
    keep = splits.kshot_subset(labels, shots=shots, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[keep], minlength=3), [shots] * 3)
    np.testing.assert_array_equal(keep, splits.kshot_subset(labels, shots=shots, seed=0))
  with pytest.raises(ValueError, match="class 1 has only 2 training images"):
    splits.kshot_subset(labels, shots=3, seed=0)
  config = finetune_config.get_config("demo")
  config.data.kshot = 2
  data = input_lib.load(config, methods.data_needs(config))
  np.testing.assert_array_equal(np.bincount(data.train.labels), [2] * 5)


@pytest.mark.slow
def test_kshot_transfer_on_the_command_line(tmp_path):
  """The unsupervised fine-tuning paper's k-shot protocol on its own kind of run (2
  steps of unsup_finetune, fakes.tiny_config's, as test_fixmatch.py's: one compiled
  run for both files): `python -m bitune_jax.cli.eval --workdir W --kshot 1,2
  --kshot_steps 2` exits 0, says each phase on the console, and prints the feature
  protocols (as recorded in evals/) plus exactly kshot_1_top1 and kshot_2_top1, each
  the top-1 in its own k-shot run's summary.json: vanilla fine-tuning trained 2 steps
  from the exported backbone on exactly k images of each of the 5 classes. Asked
  again with other steps, it trains what was asked, and the earlier records stay."""
  config = fakes.tiny_config("unsup_finetune", total_steps=2, unsup=dict(queue_size=64))
  loop.train_and_evaluate(config, str(tmp_path))
  cmd = [sys.executable, "-m", "bitune_jax.cli.eval", "--workdir", str(tmp_path),
         "--kshot", "1,2", "--kshot_steps", "2"]
  # One CPU device in the command (half the time of 8 on a small machine): the
  # checkpoint written on 8 devices is restored on 1, as a user's evaluation would.
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          cwd=processes.ROOT, env=processes.environment(1))
  assert result.returncode == 0, result.stderr[-3000:]
  # Progress on the console while it works: each phase, each k-shot run's steps.
  for said in ("evaluating ", "feature protocols", "k-shot transfer 1/2: k = 1, 2 steps",
               "k-shot transfer 2/2: k = 2, 2 steps", "step 2/2", "k-shot transfer, k = 2"):
    assert said in result.stderr, (said, result.stderr[-3000:])
  printed = json.loads(result.stdout[result.stdout.index("{"):])
  evals = tmp_path / "evals"
  assert {k for k in printed if k.startswith("kshot_")} == {"kshot_1_top1", "kshot_2_top1"}
  protocols_part = {k: v for k, v in printed.items() if not k.startswith("kshot_")}
  assert {"retrieval_top5", "kmeans_bcubed_precision", "linear_probe_top1"} <= set(
      protocols_part)
  assert json.load(open(evals / "latest-step2.json")) == protocols_part
  folder = tmp_path / "kshot" / "latest-step2"
  for k in (1, 2):  # each k's number is its own run's, trained on k images per class
    run_dir = folder / f"k{k}-steps2-seed0"
    summary = json.load(open(run_dir / "summary.json"))
    assert printed[f"kshot_{k}_top1"] == summary["top1"], k
    assert summary["step"] == 2 and summary["method"] == "finetune", (k, summary)
    record = json.load(open(evals / f"latest-step2-kshot{k}-steps2-seed0.json"))
    assert record["top1"] == summary["top1"], (k, record)
    assert record["k"] == k and record["kshot_steps"] == 2, (k, record)
    run_config = ml_collections.ConfigDict(json.load(open(run_dir / "config.json")))
    assert run_config.data.kshot == k
    assert run_config.init_from == str(folder / "backbone.npz")
    data = input_lib.load(run_config, Needs())
    np.testing.assert_array_equal(np.bincount(data.train.labels), [k] * 5,
                                  err_msg=f"k={k}")
  # Asked again with other steps, it runs what was asked (a 3-step run, not the
  # 2-step result again), and the earlier records stay.
  results = protocols.kshot_transfer(str(tmp_path), shots=(1,), total_steps=3)
  again = json.load(open(folder / "k1-steps3-seed0" / "summary.json"))
  assert again["step"] == 3 and results == {"kshot_1_top1": again["top1"]}
  assert json.load(open(evals / "latest-step2-kshot1-steps3-seed0.json"))["top1"] == (
      again["top1"])
  assert sorted(p.name for p in evals.iterdir()) == [
      "latest-step2-kshot1-steps2-seed0.json", "latest-step2-kshot1-steps3-seed0.json",
      "latest-step2-kshot2-steps2-seed0.json", "latest-step2.json"]
  # A bad k is refused before anything runs.
  with pytest.raises(SystemExit, match="2"):
    eval_cli.main(["--workdir", str(tmp_path), "--kshot", "1,x"])


def test_help_explains_every_flag_without_importing_jax():
  import subprocess  # pylint: disable=g-import-not-at-top
  run = subprocess.run(
      [sys.executable, "-c", "import sys; from bitune_jax.cli import eval as eval_cli\n"
       "try:\n  eval_cli.main(['--help'])\nexcept SystemExit:\n  pass\n"
       "print('jax imported:', 'jax' in sys.modules)"],
      capture_output=True, text=True, check=True)
  assert run.stdout.splitlines()[-1] == "jax imported: False"  # --help answers at once
  for flag, words in (("--workdir WORKDIR", "a bitune-train workdir"),
                      ("--which {latest,best}", "the checkpoint to evaluate"),
                      ("--kshot KSHOT", "k labelled images per class"),
                      ("--kshot_steps KSHOT_STEPS", "training steps of each k-shot run")):
    block = run.stdout[run.stdout.index(f"  {flag}"):]
    assert words in " ".join(block.split()[:40]), flag
