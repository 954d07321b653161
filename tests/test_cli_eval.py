"""`bitune-eval` on a workdir: the run's own numbers back, plus the feature protocols."""

import json
import os
import sys

import pytest

import outside
from bitune_jax import methods
from bitune_jax.cli import eval as eval_cli
from bitune_jax.data import input as input_lib
from bitune_jax.data import splits
from bitune_jax.experiments import protocols
from bitune_jax.training import loop

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
import finetune as finetune_config  # noqa: E402  pylint: disable=g-import-not-at-top


def test_evaluates_a_workdir_checkpoint(tmp_path, capsys):
  config = finetune_config.get_config("demo")
  config.init_from, config.image_size, config.batch_size = "", 16, 16
  config.total_steps, config.eval_every, config.checkpoint_every = 6, 3, 3
  state, summary = loop.train_and_evaluate(config, str(tmp_path))
  assert eval_cli.main(["--workdir", str(tmp_path)]) == 0
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
  best = protocols.evaluate_workdir(str(tmp_path), which="best")
  assert best["step"] in (3, 6) and best["top1"] >= metrics["top1"] - 1e-9
  # --tsne: the test features drawn; the embedding keeps their neighbourhoods.
  assert eval_cli.main(["--workdir", str(tmp_path), "--tsne"]) == 0
  drawn = json.loads(capsys.readouterr().out)["tsne"]
  assert drawn == str(tmp_path / "plots" / "tsne-latest-step6.png")
  assert open(drawn, "rb").read(4) == b"\x89PNG"
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(drawn[:-4] + ".npz") as saved:  # the points drawn: the test split's
    assert list(saved["labels"]) == list(data.test.labels)
    assert saved["embedding"].shape == (len(data.test.labels), 2)
  from sklearn.manifold import trustworthiness  # pylint: disable=g-import-not-at-top
  from bitune_jax.experiments import plots  # pylint: disable=g-import-not-at-top
  embedding, labels = plots.tsne(test_out["features"], data.test.labels,
                                 str(tmp_path / "tsne.png"), title="t")
  assert embedding.shape == (len(data.test.labels), 2)
  assert list(labels) == list(data.test.labels)
  assert trustworthiness(test_out["features"], embedding, n_neighbors=5) > 0.85


def test_refuses_a_folder_that_is_not_a_workdir(tmp_path, capsys):
  with pytest.raises(SystemExit, match="2") as info:
    eval_cli.main(["--workdir", str(tmp_path)])
  assert info.value.code == 2
  assert capsys.readouterr().err == (
      f"bitune-eval: error: {tmp_path} has no config.json: not a bitune-train workdir\n")


def test_kshot_subset_by_hand():
  from bitune_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
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
def test_kshot_transfer_from_an_unsupervised_run(tmp_path):
  import unsup_finetune as unsup_config  # pylint: disable=g-import-not-at-top
  config = unsup_config.get_config("demo")
  config.init_from, config.image_size, config.batch_size = "", 16, 16
  config.total_steps, config.eval_every, config.checkpoint_every = 2, 2, 2
  config.unsup.queue_size, config.unsup.bn_group_size = 64, 4
  loop.train_and_evaluate(config, str(tmp_path))
  results = protocols.kshot_transfer(str(tmp_path), shots=(1, 4), total_steps=3)
  assert set(results) == {"kshot_1_top1", "kshot_4_top1"}
  folder = tmp_path / "kshot" / "latest-step2"
  for k in (1, 4):  # each k's number is its own run's, trained on k images per class
    summary = json.load(open(folder / f"k{k}-steps3-seed0" / "summary.json"))
    assert summary["method"] == "finetune" and summary["step"] == 3
    assert results[f"kshot_{k}_top1"] == summary["top1"]
    run_config = json.load(open(folder / f"k{k}-steps3-seed0" / "config.json"))
    assert run_config["data"]["kshot"] == k
    assert run_config["init_from"] == str(folder / "backbone.npz")
    record = json.load(open(tmp_path / "evals" / f"latest-step2-kshot{k}-steps3-seed0.json"))
    assert record["top1"] == summary["top1"] and record["kshot_steps"] == 3


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
