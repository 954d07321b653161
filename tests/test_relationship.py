"""Tests of bitune_jax/relationship.py against answers computed by hand (or sklearn)."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from bitune_jax import relationship as rel


def _nll64(logits, labels, temperature):
  """Mean cross-entropy of softmax(logits / T) in float64 NumPy (independent check)."""
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(axis=1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  return -np.mean(log_p[np.arange(len(labels)), labels])


def _block_probs(counts, targets, *, conf=0.97):
  """Near-one-hot source probs: `counts[s]` samples of source class s, label targets[s]."""
  c_s = len(counts)
  off = (1.0 - conf) / (c_s - 1)
  probs, labels = [], []
  for s, (count, target) in enumerate(zip(counts, targets)):
    row = np.full(c_s, off)
    row[s] = conf
    probs += [row] * count
    labels += [target] * count
  return np.asarray(probs, np.float32), np.asarray(labels, np.int32)


# --------------------------------------------------------------------------- helpers
def test_probs_from_logits_with_temperature():
  # softmax([0, log 3]) = [1/4, 3/4]; doubling the logits and T = 2 gives the same.
  np.testing.assert_allclose(rel.probs_from_logits([[0.0, np.log(3.0)]]),
                             [[0.25, 0.75]], atol=1e-6)
  np.testing.assert_allclose(
      rel.probs_from_logits([[0.0, 2 * np.log(3.0)]], temperature=2.0),
      [[0.25, 0.75]], atol=1e-6)


# --------------------------------------------------------------------------- direct
def test_direct_relationship_hand_example():
  probs = np.array([[0.6, 0.3, 0.1],   # class 0
                    [0.1, 0.1, 0.8],   # class 1
                    [0.2, 0.5, 0.3],   # class 0
                    [0.0, 0.4, 0.6],   # class 1
                    [0.2, 0.4, 0.4]])  # class 1
  labels = np.array([0, 1, 0, 1, 1])
  # Class 0: mean of rows 0, 2; class 1: mean of rows 1, 3, 4.
  expected = np.array([[0.8 / 2, 0.8 / 2, 0.4 / 2],
                       [0.3 / 3, 0.9 / 3, 1.8 / 3]])
  got = rel.direct_relationship(source_probs=probs, labels=labels, num_classes=2)
  assert got.shape == (2, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=1e-6)
  np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)


# --------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("a, num_zeros", [(2.0, 80), (3.0, 60), (-1.5, 30)])
def test_calibrate_temperature_binary_closed_form(a, num_zeros):
  # Logits [a, 0] everywhere, a fraction p of labels 0: the NLL is minimised where
  # the predicted p(0) = sigmoid(a / t) equals p, i.e. t = a / log(p / (1 - p)).
  n = 100
  p = num_zeros / n
  logits = np.tile([a, 0.0], (n, 1))
  labels = np.r_[np.zeros(num_zeros), np.ones(n - num_zeros)].astype(np.int32)
  expected = a / np.log(p / (1 - p))
  got = rel.calibrate_temperature(logits, labels)
  assert isinstance(got, float)
  assert got == pytest.approx(expected, rel=1e-3)


def test_calibrate_temperature_random_logits_is_local_optimum():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(400, 5)) * 3.0
  # Labels drawn from softmax(logits / 1.7): the calibrated t should be near 1.7.
  p = np.exp(logits / 1.7)
  p /= p.sum(axis=1, keepdims=True)
  labels = np.array([rng.choice(5, p=row) for row in p])
  t = rel.calibrate_temperature(logits.astype(np.float32), labels)
  best = _nll64(logits, labels, t)
  for factor in (0.5, 2.0, 0.99, 1.01):
    assert best < _nll64(logits, labels, t * factor), factor
  assert 1.3 < t < 2.2


def test_calibrate_temperature_clips_separable_and_antiseparable():
  logits = np.tile([0.5, 0.0], (100, 1))  # Same shape as above: one compilation.
  # Every label 0 (the argmax): the NLL keeps falling as t -> 0, so t is clipped low.
  t = rel.calibrate_temperature(logits, np.zeros(100, np.int32))
  assert np.isfinite(t) and t == pytest.approx(rel.MIN_TEMPERATURE)
  t = rel.calibrate_temperature(logits, np.zeros(100, np.int32), min_temperature=0.1)
  assert t == pytest.approx(0.1)
  # Every label 1 (never the argmax): the NLL falls as t -> inf, clipped high.
  t = rel.calibrate_temperature(logits, np.ones(100, np.int32))
  assert t == pytest.approx(rel.MAX_TEMPERATURE)


# --------------------------------------------------------------------------- logistic
@pytest.mark.parametrize("l2", [0.03, 1.0, 30.0])
def test_fit_logistic_regression_matches_sklearn(l2):
  rng = np.random.default_rng(1)
  n, d, c = 300, 6, 4
  x = rng.normal(size=(n, d)).astype(np.float32)
  logits = x @ (2.0 * rng.normal(size=(d, c)))
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  y = np.array([rng.choice(c, p=row) for row in p])
  w = rel.fit_logistic_regression(x, y, num_classes=c, l2=l2)
  assert w.shape == (d, c) and w.dtype == np.float32
  ref = LogisticRegression(C=1.0 / l2, fit_intercept=False, solver="lbfgs", tol=1e-10,
                           max_iter=10_000).fit(x.astype(np.float64), y)
  np.testing.assert_allclose(w, ref.coef_.T, atol=1e-3)


# --------------------------------------------------------------------------- reverse
def test_reverse_relationship_block_structure():
  # Source classes {0, 1} occur only with target 0 (30 and 10 samples), {2, 3} only
  # with target 1 (5 and 15). The fitted p(y_t | y_s) is ~1 on the right block and ~0
  # off it, so Bayes' rule gives R[t, s] = p(s) / sum_{s' in block t} p(s'): row 0 is
  # [30, 10] / 40 = [0.75, 0.25] on {0, 1}, row 1 is [5, 15] / 20 = [0.25, 0.75].
  counts, targets = [30, 10, 5, 15], [0, 0, 1, 1]
  train_probs, train_labels = _block_probs(counts, targets)
  val_probs, val_labels = _block_probs(counts, targets)
  r, info = rel.reverse_relationship(
      train_probs=train_probs, train_labels=train_labels, val_probs=val_probs,
      val_labels=val_labels, num_classes=2)
  assert r.shape == (2, 4) and r.dtype == np.float32
  np.testing.assert_allclose(r.sum(axis=1), 1.0, atol=1e-5)
  expected = np.array([[0.75, 0.25, 0.0, 0.0], [0.0, 0.0, 0.25, 0.75]])
  np.testing.assert_allclose(r, expected, atol=2e-2)
  # Exactly, the 0.97/0.01 smoothing shifts the marginal p(s) = mean of the probs.
  marginal = np.concatenate([train_probs, val_probs]).mean(axis=0)
  exact = np.array([[marginal[0], marginal[1], 0, 0], [0, 0, marginal[2], marginal[3]]])
  np.testing.assert_allclose(r, exact / exact.sum(axis=1, keepdims=True), atol=1e-3)
  # Every l2 is 100% accurate; the tie goes to the first in the grid, the weakest
  # ridge (the official order). Separable -> T clipped low.
  assert len(info["val_accuracy"]) == len(rel.DEFAULT_L2_GRID) == 17
  np.testing.assert_array_equal(info["val_accuracy"], 1.0)
  assert info["l2"] == min(rel.DEFAULT_L2_GRID)
  assert info["temperature"] == pytest.approx(rel.MIN_TEMPERATURE)


@pytest.mark.parametrize("calibrate", [False, True])
def test_reverse_relationship_matches_bayes_rule_by_hand(calibrate):
  # Noisy data and one l2: R must equal steps (b)-(d) redone here in NumPy.
  rng = np.random.default_rng(2)
  c_s, c_t, n = 5, 3, 120
  labels = np.r_[np.arange(c_t), rng.integers(0, c_t, size=n - c_t)].astype(np.int32)
  logits = rng.normal(size=(n, c_s)) + 2.0 * np.eye(c_s)[labels]
  probs = rel.probs_from_logits(logits)
  r, info = rel.reverse_relationship(
      train_probs=probs[:80], train_labels=labels[:80], val_probs=probs[80:],
      val_labels=labels[80:], num_classes=c_t, l2_grid=(0.5,), calibrate=calibrate)
  w = rel.fit_logistic_regression(probs[:80], labels[:80], num_classes=c_t, l2=0.5)
  t = rel.calibrate_temperature(probs[80:] @ w, labels[80:]) if calibrate else 1.0
  assert info["l2"] == 0.5 and info["temperature"] == pytest.approx(t, rel=1e-5)
  if calibrate:  # Otherwise the test could not tell W / T from W.
    assert abs(np.log(t)) > 0.1, t
  p_t_given_s = np.exp(w / t) / np.exp(w / t).sum(axis=1, keepdims=True)  # [C_s, C_t]
  joint = p_t_given_s.T * probs.mean(axis=0)[None, :]  # [C_t, C_s]
  np.testing.assert_allclose(r, joint / joint.sum(axis=1, keepdims=True), atol=1e-5)
  val_acc = np.mean(np.argmax(probs[80:] @ w, axis=1) == labels[80:])
  assert info["val_accuracy"][0] == pytest.approx(val_acc)


# --------------------------------------------------------------------------- errors
def test_empty_target_class_raises_with_its_index():
  probs = np.full((4, 2), 0.5)
  labels = np.array([0, 1, 2, 4])  # class 3 of 5 is empty.
  with pytest.raises(ValueError, match="target class 3 has no training samples"):
    rel.direct_relationship(source_probs=probs, labels=labels, num_classes=5)
  with pytest.raises(ValueError, match="target class 3 has no training samples"):
    rel.reverse_relationship(train_probs=probs, train_labels=labels, val_probs=probs,
                             val_labels=labels, num_classes=5)


def test_bad_shapes_and_values_raise():
  probs, labels = np.full((4, 2), 0.5), np.array([0, 1, 0, 1])
  with pytest.raises(ValueError, match="3 entries.*N = 4"):
    rel.direct_relationship(source_probs=probs, labels=labels[:3], num_classes=2)
  with pytest.raises(ValueError, match=r"rank 2.*\(4,\)"):
    rel.direct_relationship(source_probs=probs[:, 0], labels=labels, num_classes=2)
  with pytest.raises(ValueError, match=r"rank 1.*\(4, 1\)"):
    rel.direct_relationship(source_probs=probs, labels=labels[:, None], num_classes=2)
  with pytest.raises(ValueError, match=r"labels\[1\] = 7 is outside"):
    rel.direct_relationship(source_probs=probs, labels=[0, 7, 0, 1], num_classes=2)
  with pytest.raises(ValueError, match="non-negative"):
    rel.direct_relationship(source_probs=[[1.5, -0.5]] * 4, labels=labels,
                            num_classes=2)
  with pytest.raises(ValueError, match="must be integers"):
    rel.direct_relationship(source_probs=probs, labels=labels * 1.0, num_classes=2)
  with pytest.raises(ValueError, match="disagree on the number of source classes"):
    rel.reverse_relationship(train_probs=probs, train_labels=labels,
                             val_probs=np.full((4, 4), 0.25), val_labels=labels,
                             num_classes=2)
  with pytest.raises(ValueError, match="val_labels has 3 entries"):
    rel.reverse_relationship(train_probs=probs, train_labels=labels, val_probs=probs,
                             val_labels=labels[:3], num_classes=2)
  with pytest.raises(ValueError, match="3 entries"):
    rel.calibrate_temperature(np.zeros((4, 2)), labels[:3])
  with pytest.raises(ValueError, match="l2 must be"):
    rel.fit_logistic_regression(probs, labels, num_classes=2, l2=0.0)


def test_reverse_relationship_ties_go_to_the_first_in_grid_order():
  """The official code's rule: of the ridges with the best validation accuracy, the
  first in grid order (`np.argmax`), whatever their NLLs. Separable data: every ridge
  is 100% accurate, and the weak ridge has the lower NLL, yet a strong ridge listed
  first is chosen."""
  counts, targets = [30, 10, 5, 15], [0, 0, 1, 1]
  probs, labels = _block_probs(counts, targets)
  _, info = rel.reverse_relationship(
      train_probs=probs, train_labels=labels, val_probs=probs, val_labels=labels,
      num_classes=2, l2_grid=(10.0, 1e-3))
  np.testing.assert_array_equal(info["val_accuracy"], 1.0)
  assert info["val_nll"][1] < info["val_nll"][0]
  assert info["l2"] == 10.0
  assert rel.DEFAULT_L2_GRID == tuple(1 / c for c in rel.OFFICIAL_C_GRID)
  assert rel.OFFICIAL_C_GRID[:3] == (1e4, 3e3, 1e3) and len(rel.DEFAULT_L2_GRID) == 17
