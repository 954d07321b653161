"""Tests of bitune_jax.training.evaluation: the classifier's masked accuracies (the
evaluation of whole runs: tests/test_eval_outside.py)."""

import numpy as np
import pytest

from bitune_jax.training import evaluation


# ---------------------------------------------------------------- masked accuracies
def test_masked_accuracies_hand_computed():
  predictions = np.array([0, 1, 2, 2, 9, 3])
  labels = np.array([0, 1, 1, 2, 0, 3])
  mask = np.array([1, 1, 1, 1, 0, 0])  # The last two rows are padding.
  assert evaluation.top1_accuracy(predictions, labels, mask) == pytest.approx(3 / 4)
  # Class 0: 1/1, class 1: 1/2, class 2: 1/1; class 3 only appears in padding.
  assert evaluation.mean_class_accuracy(predictions, labels, mask, 4) == pytest.approx(
      (1 + 0.5 + 1) / 3)
  assert evaluation.classification_metrics(predictions, labels, mask, 4) == pytest.approx(
      {"top1": 3 / 4, "mean_class_acc": 5 / 6})
  # Unmasking the padding changes both numbers: the mask is really applied.
  full = np.ones(6)
  assert evaluation.top1_accuracy(predictions, labels, full) == pytest.approx(4 / 6)
  assert evaluation.mean_class_accuracy(predictions, labels, full, 4) == pytest.approx(
      (0.5 + 0.5 + 1 + 1) / 4)
