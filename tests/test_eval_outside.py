"""Evaluation checked from outside the trainer: a finished run's checkpoint is restored
with orbax alone, the network is applied in eval mode to exactly the test examples (one
device, no padding, no trainer code), and top-1 and mean per-class accuracy are counted
in NumPy; `summary.json` and `bitune-eval`'s `evaluate_workdir` must report the same."""

import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bitune_jax.data import digits
from bitune_jax.experiments import protocols
from bitune_jax.methods import common
from bitune_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import bituning as bituning_config  # noqa: E402  pylint: disable=g-import-not-at-top

SEED = 0  # config.seed: the run's initialisation, training subset and batches
EVAL_BATCH = 64  # the 269 test images are 4 full batches and one of 13 + 51 padding rows
NEAR_TIE = 1e-5  # top-2 logit gap below which float reordering may flip an argmax


def _config():
  config = bituning_config.get_config("demo")
  config.init_from = ""
  config.seed = SEED
  config.image_size = 16
  config.batch_size = 16
  config.eval_batch_size = EVAL_BATCH
  config.total_steps = 6
  config.log_every = config.eval_every = config.checkpoint_every = 3
  config.bituning.queue_size = 4
  return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """`(config, workdir, summary)` of a 6-step Bi-tuning run evaluated at steps 3, 6."""
  config = _config()
  workdir = str(tmp_path_factory.mktemp("eval_outside"))
  _, summary = loop.train_and_evaluate(config, workdir)
  return config, workdir, summary


def _restore(directory):
  """The newest checkpoint in `directory` (a `checkpoints/` or `best/` folder), read
  by orbax without any target: `(step, {field: numpy tree})`."""
  steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
  assert steps, directory
  tree = ocp.StandardCheckpointer().restore(os.path.join(directory, str(steps[-1]),
                                                         "default"))
  return steps[-1], jax.device_get(tree)


def _test_split(config):
  """The digits 5-9 test split, straight from the dataset module (not the run's Input)."""
  data = digits.load_digits_transfer("target", image_size=config.image_size,
                                     sampling_rate=config.sampling_rate, seed=config.seed)
  return data["test_images"], data["test_labels"]


def _logits(config, tree, images, *, train=False):
  """Logits `[N, C]` of all `images` at once, on one device; eval mode by default."""
  model = common.Network(arch=config.arch, num_classes=config.num_classes,
                         projector_dim=config.bituning.projector_dim)
  variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
  with jax.default_device(jax.devices()[0]):
    out = model.apply(variables, jnp.asarray(images), train=train,
                      mutable=["batch_stats"] if train else False)
  return np.asarray(out[0]["logits"] if train else out["logits"], np.float64)


def _metrics(pred, labels, num_classes):
  correct = pred == labels
  per_class = [np.mean(correct[labels == c]) for c in range(num_classes)]
  return float(np.mean(correct)), float(np.mean(per_class))


def _reference(logits, labels, num_classes):
  """Every `(top1, mean per-class accuracy)` the eval-mode predictions can give, in
  NumPy: one pair, unless an example's top-2 logits are closer than `NEAR_TIE`
  (float32 reordering moves these O(1) logits by ~1e-7; the smallest gap measured
  for seed 0 is 8e-5, so normally there is none), where either class may win."""
  order = np.argsort(logits, axis=1)
  top2 = np.take_along_axis(logits, order[:, -2:], axis=1)
  ties = np.flatnonzero(top2[:, 1] - top2[:, 0] < NEAR_TIE * np.maximum(
      1.0, np.abs(top2[:, 1])))
  assert len(ties) <= 4, f"seed {SEED}: {len(ties)} near-tie examples"
  outcomes = set()
  for choice in itertools.product((-1, -2), repeat=len(ties)):
    pred = order[:, -1].copy()
    pred[ties] = order[ties, list(choice)]
    outcomes.add(_metrics(pred, labels, num_classes))
  return outcomes


def _check(reported, outcomes, what):
  """Exact agreement with one of the reference outcomes (float equality: both are
  counts over the same examples divided the same way)."""
  got = (reported["top1"], reported["mean_class_acc"])
  assert any(np.allclose(got, ref, rtol=0, atol=1e-12) for ref in outcomes), (
      f"{what}, seed {SEED}: reported top1, mean per-class {got}, NumPy reference "
      f"{sorted(outcomes)}")


def test_summary_matches_a_numpy_count_of_the_restored_checkpoint(finished_run):
  config, workdir, summary = finished_run
  images, labels = _test_split(config)
  assert len(labels) % EVAL_BATCH != 0, "the last eval batch must carry padding"
  step, tree = _restore(os.path.join(workdir, "checkpoints"))
  assert step == int(tree["step"]) == config.total_steps
  logits = _logits(config, tree, images)
  outcomes = _reference(logits, labels, config.num_classes)
  saved = json.load(open(os.path.join(workdir, "summary.json")))
  assert saved == summary and saved["step"] == step
  _check(saved, outcomes, "summary.json")
  assert saved["score"] == saved["top1"]  # the digits' metric is top-1
  # Not vacuous: the two metrics differ here (one computed as the other is caught),
  # and train-mode BatchNorm (batch statistics) predicts otherwise than eval mode.
  assert all(top1 != mean for top1, mean in outcomes), (SEED, outcomes)
  train_pred = np.argmax(_logits(config, tree, images, train=True), axis=1)
  assert np.sum(train_pred != np.argmax(logits, axis=1)) > 0, SEED


@pytest.mark.parametrize("which, folder", [("latest", "checkpoints"), ("best", "best")])
def test_evaluate_workdir_matches_a_numpy_count(finished_run, which, folder):
  config, workdir, _ = finished_run
  images, labels = _test_split(config)
  step, tree = _restore(os.path.join(workdir, folder))
  outcomes = _reference(_logits(config, tree, images), labels, config.num_classes)
  metrics = protocols.evaluate_workdir(workdir, which=which)
  assert metrics["step"] == step
  # The best checkpoint is named by how it was chosen (here: on the test split).
  assert metrics["checkpoint"] == {"latest": "latest", "best": "best-on-test"}[which]
  _check(metrics, outcomes, f"evaluate_workdir(which={which!r})")
