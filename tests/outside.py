"""Evaluation recomputed from outside the library's eval loop: the model applied in
eval mode to exactly a split's examples, in our own batches, and the protocols in
NumPy (or the library's reference-tested protocol functions on these features)."""

import jax
import numpy as np

from bitune_jax import evaluate


def eval_outputs(model, params, batch_stats, images, *, chunk=128):
  """Eval-mode outputs (`features`, `logits`, ...) of every image, as NumPy."""
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  variables = jax.device_get({"params": params, "batch_stats": batch_stats})
  parts = [jax.device_get(apply(variables, np.asarray(images[i:i + chunk])))
           for i in range(0, len(images), chunk)]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def top1_and_mean_class(logits, labels):
  """Top-1 and the mean over the classes present of each class's accuracy."""
  pred = np.argmax(logits, -1)
  per_class = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
  return float(np.mean(pred == labels)), float(np.mean(per_class))


def retrieval_topk(test_features, test_labels, train_features, train_labels, k=5):
  """Brute force: float64 cosine similarities, hit if any of the k nearest matches."""
  def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  sims = unit(test_features) @ unit(train_features).T
  nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  return float(np.mean((train_labels[nearest] == test_labels[:, None]).any(1)))


def check_feature_metrics(metrics, train, test, num_classes):
  """A run's feature protocols against ones recomputed from `(features, labels)` of
  its train and test splits. Slack: one test image for retrieval and the probe
  (float32 near-ties between our features and the loop's), 0.02 for k-means
  (a near-tie can move one point to another cluster)."""
  (train_f, train_y), (test_f, test_y) = train, test
  one = 1.0 / len(test_y) + 1e-9
  retrieval = retrieval_topk(test_f, test_y, train_f, train_y)
  assert abs(metrics["retrieval_top5"] - retrieval) <= one, (metrics, retrieval)
  probe = evaluate.linear_probe_accuracy(train_f, train_y, test_f, test_y,
                                         num_classes=num_classes)
  assert abs(metrics["linear_probe_top1"] - probe) <= one, (metrics, probe)
  kmeans = evaluate.kmeans_bcubed_precision(train_f, train_y, num_clusters=num_classes)
  assert abs(metrics["kmeans_bcubed_precision"] - kmeans) <= 0.02, (metrics, kmeans)


def eval_images(split):
  """A split's evaluation view, worked out here: the centre `size x size` of each
  uint8 cache image (offset (S - size) // 2), in [0, 1], minus the ImageNet mean, over
  its std. float32 `[N, size, size, 3]`."""
  side, size = split.images.shape[1], split.size
  top = (side - size) // 2
  crop = np.asarray(split.images)[:, top:top + size, top:top + size] / 255.0
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  return ((crop - mean) / std).astype(np.float32)
