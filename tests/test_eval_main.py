"""`bitune-eval` on a workdir: the run's own numbers back, plus the feature protocols."""

import json
import os
import sys

import pytest

from bitune_jax import eval_main, train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
import finetune as finetune_config  # noqa: E402  pylint: disable=g-import-not-at-top


def test_evaluates_a_workdir_checkpoint(tmp_path, capsys):
  config = finetune_config.get_config("demo")
  config.init_from, config.image_size, config.batch_size = "", 16, 16
  config.total_steps, config.eval_every, config.checkpoint_every = 6, 3, 3
  _, summary = train.train_and_evaluate(config, str(tmp_path))
  assert eval_main.main(["--workdir", str(tmp_path)]) == 0
  metrics = json.loads(capsys.readouterr().out)
  assert metrics["step"] == 6
  assert metrics["top1"] == pytest.approx(summary["top1"])
  assert metrics["mean_class_acc"] == pytest.approx(summary["mean_class_acc"])
  for key in ("retrieval_top5", "kmeans_bcubed_precision", "linear_probe_top1"):
    assert 0.0 <= metrics[key] <= 1.0
  assert json.load(open(tmp_path / "eval.json")) == metrics
  best = eval_main.evaluate_workdir(str(tmp_path), which="best")
  assert best["step"] in (3, 6) and best["top1"] >= metrics["top1"] - 1e-9


def test_refuses_a_folder_that_is_not_a_workdir(tmp_path):
  with pytest.raises(SystemExit) as info:
    eval_main.main(["--workdir", str(tmp_path)])
  assert info.value.code == 2


def test_kshot_subset_by_hand():
  from bitune_jax.data import digits  # pylint: disable=g-import-not-at-top
  from bitune_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
  for shots in (1, 2, 4):
    keep = digits.kshot_subset(labels, shots=shots, seed=0)
    counts = np.bincount(labels[keep], minlength=3)
    np.testing.assert_array_equal(counts, np.minimum(np.bincount(labels), shots))
    np.testing.assert_array_equal(keep, digits.kshot_subset(labels, shots=shots, seed=0))
  config = finetune_config.get_config("demo")
  config.data.kshot = 2
  data = input_lib.load(config, two_views=False)
  np.testing.assert_array_equal(np.bincount(data.train.labels), [2] * 5)


@pytest.mark.slow
def test_kshot_transfer_from_an_unsupervised_run(tmp_path):
  import unsup_finetune as unsup_config  # pylint: disable=g-import-not-at-top
  config = unsup_config.get_config("demo")
  config.init_from, config.image_size, config.batch_size = "", 16, 16
  config.total_steps, config.eval_every, config.checkpoint_every = 2, 2, 2
  config.unsup.queue_size, config.unsup.bn_group_size = 64, 4
  train.train_and_evaluate(config, str(tmp_path))
  results = eval_main.kshot_transfer(str(tmp_path), shots=(1, 4), total_steps=3)
  assert set(results) == {"kshot_1_top1", "kshot_4_top1"}
  assert all(0.0 <= v <= 1.0 for v in results.values())
  summary = json.load(open(tmp_path / "kshot" / "k1_seed0" / "summary.json"))
  assert summary["method"] == "finetune" and summary["step"] == 3
  run_config = json.load(open(tmp_path / "kshot" / "k1_seed0" / "config.json"))
  assert run_config["data"]["kshot"] == 1
  assert run_config["init_from"].endswith("kshot/backbone.npz")
