"""Tests of bitune_jax.evaluate: the feature protocols."""

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from bitune_jax import evaluate


# ------------------------------------------------------------------------ references
def _bcubed_reference(assignments, labels):
  """O(N^2) transliteration of the BCubed definition: (precision, recall)."""
  n = len(assignments)
  precision = recall = 0.0
  for i in range(n):
    same_cluster = [j for j in range(n) if assignments[j] == assignments[i]]
    same_label = [j for j in range(n) if labels[j] == labels[i]]
    both = [j for j in same_cluster if labels[j] == labels[i]]
    precision += len(both) / len(same_cluster)
    recall += len(both) / len(same_label)
  return precision / n, recall / n


def _retrieval_reference(queries, q_labels, gallery, g_labels, k):
  """Full cosine-similarity matrix, stable descending sort (lower index first)."""
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
  order = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :k]
  return float(np.mean([q_labels[i] in g_labels[order[i]] for i in range(len(q))]))


def _blobs(rng, *, num_classes, per_class, dim, spread=20.0, noise=0.5):
  """Well-separated Gaussian blobs: `(features [C * per_class, dim], labels)`."""
  centers = rng.normal(size=(num_classes, dim)) * spread
  labels = np.repeat(np.arange(num_classes), per_class)
  features = centers[labels] + noise * rng.normal(size=(len(labels), dim))
  perm = rng.permutation(len(labels))
  return features[perm], labels[perm]


def _inertia(x, assignments, centers):
  return float(np.sum((x - centers[assignments].astype(np.float64)) ** 2))


# --------------------------------------------------------------------------- BCubed
def test_bcubed_hand_computed():
  # Clusters {a, a, b} and {b, b}.
  assignments, labels = [0, 0, 0, 1, 1], ["a", "a", "b", "b", "b"]
  expected = (2 / 3 + 2 / 3 + 1 / 3 + 1 + 1) / 5
  assert evaluate.bcubed_precision(assignments, labels) == pytest.approx(expected)
  assert evaluate.bcubed_recall(assignments, labels) == pytest.approx(
      (1 + 1 + 1 / 3 + 2 / 3 + 2 / 3) / 5)
  # Clusters {a, a, b, b} and {b}: precision and recall differ.
  assignments, labels = [5, 5, 5, 5, 2], ["a", "a", "b", "b", "b"]
  p, r = 3 / 5, (1 + 1 + 2 / 3 + 2 / 3 + 1 / 3) / 5
  assert evaluate.bcubed_precision(assignments, labels) == pytest.approx(p)
  assert evaluate.bcubed_recall(assignments, labels) == pytest.approx(r)
  assert evaluate.bcubed_f1(assignments, labels) == pytest.approx(2 * p * r / (p + r))
  # Singletons are perfectly precise; a single cluster has perfect recall.
  labels = [0, 1, 1, 2, 2, 2]
  assert evaluate.bcubed_precision(np.arange(6), labels) == 1.0
  assert evaluate.bcubed_recall(np.zeros(6), labels) == 1.0
  assert evaluate.bcubed_precision(np.zeros(6), labels) == pytest.approx(
      (1 + 4 + 9) / 36)


@pytest.mark.parametrize("seed", range(4))
def test_bcubed_matches_quadratic_reference(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 200))
  # Sparse, non-contiguous, negative ids: only equality may matter.
  assignments = rng.choice([-7, 0, 3, 11, 400, 9999], size=n)[
      rng.permutation(n)] * int(rng.integers(1, 4))
  labels = rng.integers(0, int(rng.integers(1, 12)), size=n) * 13 - 5
  p_ref, r_ref = _bcubed_reference(assignments.tolist(), labels.tolist())
  close = lambda value: pytest.approx(value, abs=1e-12)
  assert evaluate.bcubed_precision(assignments, labels) == close(p_ref)
  assert evaluate.bcubed_recall(assignments, labels) == close(r_ref)
  assert evaluate.bcubed_f1(assignments, labels) == close(
      2 * p_ref * r_ref / (p_ref + r_ref))


def test_bcubed_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="labels"):
    evaluate.bcubed_precision([0, 1, 1], [0, 1])


# ------------------------------------------------------------------------ retrieval
@pytest.mark.parametrize("k", [1, 5])
def test_retrieval_matches_brute_force(k):
  rng = np.random.default_rng(100 + k)
  num_q, num_g, dim = 300, 500, 16
  gallery = rng.normal(size=(num_g, dim)) * rng.uniform(0.1, 10, size=(num_g, 1))
  g_labels = rng.integers(0, 10, size=num_g)
  # Queries near some gallery items, so the accuracy is neither 0 nor 1.
  queries = gallery[rng.integers(0, num_g, size=num_q)] + rng.normal(size=(num_q, dim))
  q_labels = rng.integers(0, 10, size=num_q)
  q_labels[:150] = g_labels[np.argmax(queries[:150] @ gallery.T, axis=1)]
  expected = _retrieval_reference(queries, q_labels, gallery, g_labels, k)
  assert 0.0 < expected < 1.0
  for chunk in (64, 1024):  # 64 does not divide 300: the padded last chunk counts.
    got = evaluate.retrieval_topk_accuracy(queries, q_labels, gallery, g_labels, k=k,
                                           chunk_size=chunk)
    assert got == pytest.approx(expected, abs=1e-12)


def test_retrieval_hand_case_and_ties():
  gallery = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 0.0], [-1.0, 0.0]])
  g_labels = np.array([0, 1, 2, 3])
  # Gallery items 0 and 2 tie for [1, 0] (cosine 1): the lower index ranks first.
  acc = lambda q, y, k: evaluate.retrieval_topk_accuracy(
      np.array(q), np.array(y), gallery, g_labels, k=k, chunk_size=1)
  assert acc([[2.0, 0.0]], [2], 1) == 0.0
  assert acc([[2.0, 0.0]], [2], 2) == 1.0
  assert acc([[2.0, 0.0]], [0], 1) == 1.0
  assert acc([[2.0, 0.0]], [3], 3) == 0.0  # [-1, 0] is the farthest.
  assert acc([[2.0, 0.0]], [3], 4) == 1.0
  queries = [[0.0, 3.0], [1.0, 0.1], [-2.0, 0.5]]  # -> items 1, 0, 3.
  assert acc(queries, [1, 0, 1], 1) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="exceeds"):
    acc([[1.0, 0.0]], [0], 5)


# -------------------------------------------------------------------------- k-means
def test_kmeans_recovers_blobs_and_is_deterministic():
  rng = np.random.default_rng(0)
  x, labels = _blobs(rng, num_classes=6, per_class=80, dim=8)
  assignments, centers = evaluate.kmeans(x, num_clusters=6, seed=3)
  assert assignments.shape == (480,) and centers.shape == (6, 8)
  assert evaluate.bcubed_precision(assignments, labels) == 1.0
  assert evaluate.bcubed_recall(assignments, labels) == 1.0
  for c in range(6):  # Converged: every center is the mean of its cluster.
    np.testing.assert_allclose(centers[c], x[assignments == c].mean(axis=0), atol=1e-3)
  again, centers_again = evaluate.kmeans(x, num_clusters=6, seed=3)
  np.testing.assert_array_equal(again, assignments)
  np.testing.assert_array_equal(centers_again, centers)


def test_kmeans_inertia_close_to_sklearn():
  # Both are local searches, so a single draw may land either side; fixed seeds keep
  # the 1% margin reproducible.
  gains = []
  for seed in range(3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1000, 16)) * rng.uniform(0.5, 2.0, size=16)
    assignments, centers = evaluate.kmeans(x, num_clusters=10, seed=seed)
    ours = _inertia(x, assignments, centers)
    theirs = KMeans(n_clusters=10, n_init=4, random_state=seed).fit(x).inertia_
    assert ours <= 1.01 * theirs, (seed, ours, theirs)
    # Best of 4 runs: never worse than its own first run, usually better.
    single = _inertia(x, *evaluate.kmeans(x, num_clusters=10, seed=seed, num_init=1))
    assert ours <= single * (1 + 1e-6)
    gains.append(single - ours)
  assert max(gains) > 0


def test_kmeans_bcubed_precision_normalises_features():
  rng = np.random.default_rng(1)
  directions = rng.normal(size=(4, 6))
  labels = rng.permutation(np.repeat(np.arange(4), 50))
  # Same directions at norms 0.1 .. 10: only L2 normalisation makes the clusters tight.
  norms = rng.uniform(0.1, 10.0, size=(200, 1))
  x = (directions[labels] + 0.01 * rng.normal(size=(200, 6))) * norms
  assert evaluate.kmeans_bcubed_precision(x, labels, num_clusters=4) == 1.0
  assignments, _ = evaluate.kmeans(x, num_clusters=4)
  assert evaluate.bcubed_precision(assignments, labels) < 1.0


# ------------------------------------------------------------------------ linear probe
def _digits_split(test_fraction=0.3, seed=0):
  """Stratified split of sklearn's digits (flattened 8x8 pixels)."""
  digits = load_digits()
  rng = np.random.default_rng(seed)
  test = np.zeros(len(digits.target), bool)
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(digits.target == c))
    test[idx[:int(round(test_fraction * len(idx)))]] = True
  x, y = digits.data.astype(np.float32), digits.target
  return x[~test], y[~test], x[test], y[test]


def test_linear_probe_separable_blobs():
  rng = np.random.default_rng(2)
  x, y = _blobs(rng, num_classes=5, per_class=60, dim=10, spread=5.0)
  acc = evaluate.linear_probe_accuracy(x[:200], y[:200], x[200:], y[200:],
                                       num_classes=5)
  assert acc >= 0.99


def test_linear_probe_and_feature_metrics_on_digits():
  x_tr, y_tr, x_te, y_te = _digits_split()
  assert np.all(np.bincount(y_te) >= 50)
  acc = evaluate.linear_probe_accuracy(x_tr, y_tr, x_te, y_te, num_classes=10)
  assert acc > 0.9
  metrics = evaluate.feature_metrics(x_tr, y_tr, x_te, y_te, num_classes=10)
  assert set(metrics) == {"retrieval_top5", "kmeans_bcubed_precision",
                          "linear_probe_top1"}
  assert metrics["linear_probe_top1"] == acc
  assert metrics["retrieval_top5"] == pytest.approx(
      _retrieval_reference(x_te, y_te, x_tr, y_tr, 5))
  assert metrics["retrieval_top5"] > 0.95
  assert 0.5 < metrics["kmeans_bcubed_precision"] <= 1.0
