"""Evaluating a train state: the classifier's accuracy, or the feature protocols for
the methods trained without labels (`Method.evaluation`). The loop, bitune-eval and the
sweep all evaluate through here.

Accuracies are of masked predictions: the padding rows of the last eval batch carry
mask 0 and are never counted.
"""

from typing import Dict

import jax
import numpy as np
from numpy.typing import ArrayLike

from bitune_jax import evaluate, sharding
from bitune_jax.methods import common


def top1_accuracy(predictions: ArrayLike, labels: ArrayLike, mask: ArrayLike) -> float:
  mask = np.asarray(mask, bool)
  return float(np.mean(np.asarray(predictions)[mask] == np.asarray(labels)[mask]))


def mean_class_accuracy(predictions: ArrayLike, labels: ArrayLike, mask: ArrayLike,
                        num_classes: int) -> float:
  """Mean over the classes present in `labels` of each class's accuracy."""
  mask = np.asarray(mask, bool)
  predictions, labels = np.asarray(predictions)[mask], np.asarray(labels)[mask]
  correct = np.bincount(labels, weights=predictions == labels, minlength=num_classes)
  counts = np.bincount(labels, minlength=num_classes)
  present = counts > 0
  return float(np.mean(correct[present] / counts[present]))


def classification_metrics(predictions: ArrayLike, labels: ArrayLike, mask: ArrayLike,
                           num_classes: int) -> Dict[str, float]:
  return {"top1": top1_accuracy(predictions, labels, mask),
          "mean_class_acc": mean_class_accuracy(predictions, labels, mask, num_classes)}



def extract_features(run, state, split, *, batch_size, mesh):
  """Eval-mode pooled backbone features `[N, F]` of a split, and their labels `[N]`."""
  return common.eval_outputs(run.model, state, split, output="features",
                             batch_size=batch_size, mesh=mesh)


def feature_eval(run, state, config, mesh, split=None):
  """The feature protocols: retrieval top-5 (`split`, default test, against train),
  k-means BCubed precision and a linear probe, on eval-mode backbone features."""
  (train_f, train_y), (test_f, test_y) = (
      extract_features(run, state, s, batch_size=config.eval_batch_size, mesh=mesh)
      for s in (run.data.train, split or run.data.test))
  return evaluate.feature_metrics(train_f, train_y, test_f, test_y,
                                  num_classes=config.num_classes)


def run_eval(run, state, config, mesh, split=None):
  """Top-1 and mean per-class accuracy of the classifier on `split` (default: test),
  and `score`, the dataset's headline metric (`Input.metric`); for methods trained
  without labels (`evaluation="features"`), the feature protocols instead."""
  if run.method.evaluation == "features":
    return feature_eval(run, state, config, mesh, split)
  outputs = []
  for batch in (split or run.data.test).batches(config.eval_batch_size):
    outputs.append(jax.device_get(run.eval_step(state,
                                                sharding.global_batch(batch, mesh))))
  pred, labels, mask = (np.concatenate(x) for x in zip(*outputs))
  metrics = classification_metrics(pred, labels, mask, config.num_classes)
  return dict(metrics, score=metrics[run.data.metric])
