"""The feature-quality protocols of Bi-tuning and of unsupervised fine-tuning on
frozen features: cosine top-k retrieval, k-means clustering scored by BCubed
precision, and a linear probe (`feature_metrics` runs all three). The classifier's
accuracies are `bitune_jax.training.evaluation`'s.
"""

import functools
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike


# --------------------------------------------------------------- feature protocols
# Pure functions of frozen feature arrays (NumPy in, Python floats / NumPy out), the
# representation-quality protocols of Bi-tuning and of MoCo's unsupervised
# fine-tuning on small target data: top-k retrieval, k-means + BCubed precision and
# a linear probe. The heavy math runs in JAX (float32, HIGHEST matmul precision).
_HIGHEST = jax.lax.Precision.HIGHEST
_NORM_EPS = 1e-12  # Zero vectors stay zero after L2 normalisation.
_STD_EPS = 1e-8  # Constant features are only centred by the linear probe.


def _error(fn, message):
  return ValueError(f"{fn}: {message}")


def _check_features(fn, name, x):
  """Float64 copy of a finite, non-empty rank-2 `x [N, F]`."""
  x = np.asarray(x)
  if x.ndim != 2 or x.size == 0:
    raise _error(fn, f"{name} must be a non-empty [N, F] array, got shape {x.shape}")
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    raise _error(fn, f"{name} has non-finite entries")
  return x


def _check_labels(fn, name, labels, num_rows):
  """Int64 copy of the integer labels `[num_rows]`."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != num_rows:
    raise _error(fn, f"{name} must have shape [{num_rows}], got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise _error(fn, f"{name} must be integers, got dtype {labels.dtype}")
  return labels.astype(np.int64)


def _check_positive_int(fn, name, value):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise _error(fn, f"{name} must be a positive int, got {value!r}")
  return int(value)


def _l2_normalize(x):
  """Rows of `x [N, F]` scaled to unit L2 norm (zero rows stay zero)."""
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _NORM_EPS)


# ------------------------------------------------------------------------ retrieval
@functools.partial(jax.jit, static_argnames=("k",))
def _topk_neighbours(queries, gallery, *, k):
  """Indices `[Q, k]` of the k most similar gallery rows, ties to the lower index."""
  sims = jnp.dot(queries, gallery.T, precision=_HIGHEST)  # [Q, Ng]
  return jax.lax.top_k(sims, k)[1]  # top_k puts the lower index first on ties.


def retrieval_topk_accuracy(query_features: ArrayLike, query_labels: ArrayLike,
                            gallery_features: ArrayLike, gallery_labels: ArrayLike, *,
                            k: int = 5, chunk_size: int = 1024) -> float:
  """Top-k retrieval accuracy with cosine similarity.

  Every query (a test image) retrieves its k most cosine-similar gallery items (the
  training set); it counts as correct if ANY of them carries the query's label, the
  "top-5 retrieval accuracy" of the unsupervised fine-tuning protocol. Both sides
  are L2-normalised (all-zero rows stay zero: similarity 0 to everything). Ties in
  similarity are broken stably: the lower gallery index ranks first. Similarities
  are float32, so near-ties closer than float32 rounding may order either way.

  Args:
    query_features: `[Nq, F]` query features.
    query_labels: `[Nq]` integer labels of the queries.
    gallery_features: `[Ng, F]` gallery features.
    gallery_labels: `[Ng]` integer labels of the gallery.
    k: neighbours per query, `1 <= k <= Ng`.
    chunk_size: queries per similarity block; memory is `O(chunk_size * Ng)`.

  Returns:
    The fraction of queries with a same-label item among their k neighbours.
  """
  fn = "retrieval_topk_accuracy"
  queries = _check_features(fn, "query_features", query_features)
  gallery = _check_features(fn, "gallery_features", gallery_features)
  if queries.shape[1] != gallery.shape[1]:
    raise _error(fn, f"feature dims differ: queries {queries.shape}, gallery "
                 f"{gallery.shape}")
  q_labels = _check_labels(fn, "query_labels", query_labels, queries.shape[0])
  g_labels = _check_labels(fn, "gallery_labels", gallery_labels, gallery.shape[0])
  k = _check_positive_int(fn, "k", k)
  if k > gallery.shape[0]:
    raise _error(fn, f"k = {k} exceeds the gallery size {gallery.shape[0]}")
  chunk = min(_check_positive_int(fn, "chunk_size", chunk_size), queries.shape[0])
  queries = _l2_normalize(queries).astype(np.float32)
  gallery = jnp.asarray(_l2_normalize(gallery), jnp.float32)
  hits = np.zeros(queries.shape[0], bool)
  for start in range(0, queries.shape[0], chunk):
    block = queries[start:start + chunk]
    rows = block.shape[0]
    if rows < chunk:  # Pad the last block: one compiled shape for every block.
      block = np.pad(block, ((0, chunk - rows), (0, 0)))
    nbrs = np.asarray(_topk_neighbours(jnp.asarray(block), gallery, k=k))[:rows]
    hits[start:start + rows] = np.any(
        g_labels[nbrs] == q_labels[start:start + rows, None], axis=1)
  return float(np.mean(hits))


# -------------------------------------------------------------------------- k-means
def _sq_dists(x, x_sq, centers):
  """Squared Euclidean distances `[N, K]` of `x [N, F]` to `centers [K, F]`."""
  cross = jnp.dot(x, centers.T, precision=_HIGHEST)
  c_sq = jnp.sum(centers * centers, axis=1)
  return jnp.maximum(x_sq[:, None] - 2.0 * cross + c_sq[None, :], 0.0)


def _kmeans_pp(draws, x, x_sq, *, num_clusters):
  """Greedy k-means++ seeding: `centers [K, F]` chosen among the rows of `x`.

  Each new center is the best (lowest resulting potential) of T candidates drawn
  with probability proportional to the squared distance to the nearest center
  chosen so far (D^2 sampling; uniform if all distances are 0). `draws [K, T]`
  holds uniforms in [0, 1): `draws[0, 0]` picks the first center uniformly,
  `draws[i]` the candidates of center i (inverse-CDF sampling).
  """
  n = x.shape[0]
  first = jnp.minimum((draws[0, 0] * n).astype(jnp.int32), n - 1)
  centers = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(x[first])
  closest = _sq_dists(x, x_sq, x[first][None])[:, 0]  # [N]

  def body(i, carry):
    centers, closest = carry
    cdf = jnp.cumsum(closest)
    # Index of the first cdf entry above u * total (never a zero-mass point).
    above = jnp.sum(cdf[None, :] <= draws[i][:, None] * cdf[-1], axis=1)
    cands = jnp.where(cdf[-1] > 0, above, (draws[i] * n).astype(jnp.int32))
    cands = jnp.minimum(cands, n - 1)  # [T]
    cand_d = _sq_dists(x, x_sq, x[cands])  # [N, T]
    best = jnp.argmin(jnp.sum(jnp.minimum(closest[:, None], cand_d), axis=0))
    centers = centers.at[i].set(x[cands[best]])
    return centers, jnp.minimum(closest, cand_d[:, best])

  return jax.lax.fori_loop(1, num_clusters, body, (centers, closest))[0]


def _lloyd(x, x_sq, centers, *, num_iters):
  """Lloyd iterations from `centers [K, F]` until assignments stop changing.

  An empty cluster keeps its previous center. Returns `(assignments [N], centers
  [K, F], inertia)`, the assignments being those of the returned centers.
  """
  num_clusters = centers.shape[0]
  assign = lambda c: jnp.argmin(_sq_dists(x, x_sq, c), axis=1)

  def body(carry):
    it, centers, labels, _ = carry
    sums = jax.ops.segment_sum(x, labels, num_segments=num_clusters)
    counts = jnp.bincount(labels, length=num_clusters)[:, None]
    centers = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), centers)
    new = assign(centers)
    return it + 1, centers, new, jnp.any(new != labels)

  keep_going = lambda carry: (carry[0] < num_iters) & carry[3]
  init = (jnp.int32(0), centers, assign(centers), jnp.asarray(True))
  _, centers, labels, _ = jax.lax.while_loop(keep_going, body, init)
  inertia = jnp.sum(jnp.min(_sq_dists(x, x_sq, centers), axis=1))
  return labels, centers, inertia


@functools.partial(jax.jit, static_argnames=("num_iters",))
def _kmeans_runs(draws, x, *, num_iters):
  """One k-means run per `draws [R, K, T]` slice; returns the lowest-inertia one."""
  x_sq = jnp.sum(x * x, axis=1)

  def run(run_draws):
    centers = _kmeans_pp(run_draws, x, x_sq, num_clusters=draws.shape[1])
    return _lloyd(x, x_sq, centers, num_iters=num_iters)

  labels, centers, inertia = jax.vmap(run)(draws)
  best = jnp.argmin(inertia)  # Ties -> the first run.
  return labels[best], centers[best], inertia[best]


def kmeans(features: ArrayLike, *, num_clusters: int, seed: int = 0, num_iters: int = 100,
           num_init: int = 4) -> Tuple[np.ndarray, np.ndarray]:
  """K-means (Lloyd's algorithm, greedy k-means++ seeding), best of `num_init` runs.

  Operates on `features` as given (no normalisation; see `kmeans_bcubed_precision`
  for the protocol). The data are centred on their mean internally for float32
  accuracy. Runs are deterministic given `seed` (the k-means++ uniforms come from
  NumPy's generator seeded with `[seed, i]` for run i, so raising `num_init` never
  raises the inertia); the lowest-inertia run wins.

  Args:
    features: `[N, F]` points.
    num_clusters: K, `1 <= K <= N`.
    seed: non-negative integer seed of the k-means++ sampling.
    num_iters: cap on Lloyd iterations per run (each run stops earlier once its
      assignments no longer change).
    num_init: number of independent seeded runs.

  Returns:
    `(assignments [N] int32 in [0, K), centers [K, F] float32)`. With fewer than K
    distinct points some clusters stay empty (their centers repeat points).
  """
  fn = "kmeans"
  x = _check_features(fn, "features", features)
  num_clusters = _check_positive_int(fn, "num_clusters", num_clusters)
  if num_clusters > x.shape[0]:
    raise _error(fn, f"num_clusters = {num_clusters} exceeds the {x.shape[0]} points")
  num_iters = _check_positive_int(fn, "num_iters", num_iters)
  num_init = _check_positive_int(fn, "num_init", num_init)
  num_trials = 2 + int(np.log(num_clusters))
  # Run i draws from its own stream, so runs 0..n-1 are shared by all num_init >= n.
  draws = np.stack([np.random.default_rng([int(seed), i]).random(
      (num_clusters, num_trials)) for i in range(num_init)])
  mean = x.mean(axis=0)
  labels, centers, _ = _kmeans_runs(
      jnp.asarray(draws, jnp.float32), jnp.asarray(x - mean, jnp.float32),
      num_iters=num_iters)
  return (np.asarray(labels, np.int32),
          (np.asarray(centers, np.float64) + mean).astype(np.float32))


# --------------------------------------------------------------------------- BCubed
def _bcubed_counts(fn, assignments, labels):
  """Per (cluster, label) pair: its count, the cluster's size and the label's size.

  Built from the sparse contingency table in O(N log N) time (a sort), O(N) memory.
  """
  assignments = np.asarray(assignments)
  if assignments.ndim != 1 or assignments.size == 0:
    raise _error(fn, f"assignments must be a non-empty [N] array, got shape "
                 f"{assignments.shape}")
  labels = np.asarray(labels)
  if labels.shape != assignments.shape:
    raise _error(fn, f"labels must have shape {assignments.shape}, got {labels.shape}")
  _, cluster = np.unique(assignments, return_inverse=True)
  _, label = np.unique(labels, return_inverse=True)
  num_labels = int(label.max()) + 1
  pairs, counts = np.unique(cluster.astype(np.int64) * num_labels + label,
                            return_counts=True)
  cluster_sizes = np.bincount(cluster)[pairs // num_labels]
  label_sizes = np.bincount(label)[pairs % num_labels]
  return counts.astype(np.float64), cluster_sizes, label_sizes


def bcubed_precision(assignments: ArrayLike, labels: ArrayLike) -> float:
  """BCubed precision (Amigó et al., 2009) of a clustering against labels.

  The mean over items i of |{j in cluster(i): label(j) = label(i)}| / |cluster(i)|,
  i itself included: `sum_{c,l} n_cl^2 / n_c / N` over the contingency table.

  Args:
    assignments: `[N]` cluster ids (any comparable values).
    labels: `[N]` ground-truth labels (any comparable values).

  Returns:
    The precision, a float in `(0, 1]`.
  """
  counts, cluster_sizes, _ = _bcubed_counts("bcubed_precision", assignments, labels)
  return float(np.sum(counts * counts / cluster_sizes) / np.sum(counts))


def bcubed_recall(assignments: ArrayLike, labels: ArrayLike) -> float:
  """BCubed recall: mean over items of the share of their class in their cluster.

  Args:
    assignments: `[N]` cluster ids.
    labels: `[N]` ground-truth labels.

  Returns:
    `sum_{c,l} n_cl^2 / n_l / N`, a float in `(0, 1]`.
  """
  counts, _, label_sizes = _bcubed_counts("bcubed_recall", assignments, labels)
  return float(np.sum(counts * counts / label_sizes) / np.sum(counts))


def bcubed_f1(assignments: ArrayLike, labels: ArrayLike) -> float:
  """Harmonic mean of BCubed precision and recall (`[N]` ids and `[N]` labels)."""
  p, r = bcubed_precision(assignments, labels), bcubed_recall(assignments, labels)
  return float(2.0 * p * r / (p + r))


def kmeans_bcubed_precision(features: ArrayLike, labels: ArrayLike, *, num_clusters: int,
                            seed: int = 0) -> float:
  """The clustering protocol: BCubed precision of k-means on L2-normalised features.

  Args:
    features: `[N, F]` (training) features; each row is L2-normalised first.
    labels: `[N]` integer labels.
    num_clusters: K, as many clusters as classes.
    seed: k-means seed.

  Returns:
    BCubed precision of the k-means assignments against `labels`.
  """
  fn = "kmeans_bcubed_precision"
  x = _check_features(fn, "features", features)
  labels = _check_labels(fn, "labels", labels, x.shape[0])
  assignments, _ = kmeans(_l2_normalize(x), num_clusters=num_clusters, seed=seed)
  return bcubed_precision(assignments, labels)


# ----------------------------------------------------------------------- linear probe
def linear_probe_accuracy(train_features: ArrayLike, train_labels: ArrayLike,
                          test_features: ArrayLike, test_labels: ArrayLike, *,
                          num_classes: int, l2: float = 1.0,
                          max_iters: int = 1000) -> float:
  """Test top-1 of multinomial logistic regression on frozen features.

  Features are standardised with the training mean and std (constant features are
  only centred), a constant 1 is appended as the intercept feature (so the intercept
  is penalised too), and `bitune_jax.relationship.fit_logistic_regression` fits
  `sum CE + 0.5 * l2 * ||W||^2` (sklearn's `C = 1 / l2`). Prediction ties go to the
  lower class.

  Args:
    train_features: `[N_tr, F]` training features.
    train_labels: `[N_tr]` labels in `[0, num_classes)`.
    test_features: `[N_te, F]` test features.
    test_labels: `[N_te]` labels in `[0, num_classes)`.
    num_classes: C.
    l2: ridge strength, > 0.
    max_iters: L-BFGS iteration cap.

  Returns:
    The test top-1 accuracy.
  """
  from bitune_jax import relationship  # pylint: disable=import-outside-toplevel
  fn = "linear_probe_accuracy"
  train = _check_features(fn, "train_features", train_features)
  test = _check_features(fn, "test_features", test_features)
  if train.shape[1] != test.shape[1]:
    raise _error(fn, f"feature dims differ: train {train.shape}, test {test.shape}")
  train_labels = _check_labels(fn, "train_labels", train_labels, train.shape[0])
  test_labels = _check_labels(fn, "test_labels", test_labels, test.shape[0])
  mean, std = train.mean(axis=0), train.std(axis=0)
  std = np.where(std > _STD_EPS, std, 1.0)
  design = lambda x: np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
  w = relationship.fit_logistic_regression(
      design(train), train_labels, num_classes=num_classes, l2=l2, max_iters=max_iters)
  predictions = np.argmax(design(test) @ w.astype(np.float64), axis=1)
  return float(np.mean(predictions == test_labels))


def feature_metrics(train_features: ArrayLike, train_labels: ArrayLike,
                    test_features: ArrayLike, test_labels: ArrayLike, *,
                    num_classes: int, seed: int = 0, l2: float = 1.0) -> Dict[str, float]:
  """All feature protocols at once.

  Args:
    train_features: `[N_tr, F]` training-set features (the retrieval gallery, the
      clustered set and the probe's training data).
    train_labels: `[N_tr]` labels in `[0, num_classes)`.
    test_features: `[N_te, F]` test-set features (retrieval queries, probe test set).
    test_labels: `[N_te]` labels in `[0, num_classes)`.
    num_classes: C, also the number of k-means clusters.
    seed: k-means seed.
    l2: linear-probe ridge strength.

  Returns:
    `{"retrieval_top5", "kmeans_bcubed_precision", "linear_probe_top1"}` floats.
  """
  return {
      "retrieval_top5": retrieval_topk_accuracy(
          test_features, test_labels, train_features, train_labels, k=5),
      "kmeans_bcubed_precision": kmeans_bcubed_precision(
          train_features, train_labels, num_clusters=num_classes, seed=seed),
      "linear_probe_top1": linear_probe_accuracy(
          train_features, train_labels, test_features, test_labels,
          num_classes=num_classes, l2=l2),
  }
