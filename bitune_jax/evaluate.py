"""Evaluation protocols. Top-1 and mean per-class accuracy from masked predictions
(padding rows of the last eval batch carry mask 0 and are never counted)."""

import numpy as np


def top1_accuracy(predictions, labels, mask):
  mask = np.asarray(mask, bool)
  return float(np.mean(np.asarray(predictions)[mask] == np.asarray(labels)[mask]))


def mean_class_accuracy(predictions, labels, mask, num_classes):
  """Mean over the classes present in `labels` of each class's accuracy."""
  mask = np.asarray(mask, bool)
  predictions, labels = np.asarray(predictions)[mask], np.asarray(labels)[mask]
  correct = np.bincount(labels, weights=predictions == labels, minlength=num_classes)
  counts = np.bincount(labels, minlength=num_classes)
  present = counts > 0
  return float(np.mean(correct[present] / counts[present]))


def classification_metrics(predictions, labels, mask, num_classes):
  return {"top1": top1_accuracy(predictions, labels, mask),
          "mean_class_acc": mean_class_accuracy(predictions, labels, mask, num_classes)}
