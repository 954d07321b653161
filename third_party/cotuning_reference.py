"""NumPy / scikit-learn transliteration of the official Co-Tuning code's relationship
learning (thuml/CoTuning, `module/relationship_learning.py`), written for this
project's parity tests from its semantics; the library never imports it.

  * source probabilities: `softmax(0.8840456604957581 * logits)` (the calibrated
    scale of the ImageNet ResNet-50), in both approaches;
  * direct: the mean source distribution of each target class over train + validation;
  * reverse: for C in [1e4, 3e3, 1e3, ..., 1e-4] a multinomial logistic regression
    without intercept (scikit-learn, C the inverse ridge) on the train split, the
    first C of best validation accuracy (`np.argmax`), a scale fitted to its validation
    logits by minimising the NLL, `p(t | s) = softmax(coef.T * scale)` over t, then
    Bayes' rule with the source marginal (mean over train + validation), rows over s
    normalised.

The official fits stop at scikit-learn's default 100 iterations; `max_iter` here
defaults to a converged fit (what the library computes) and can be set to 100.
"""

import numpy as np
from scipy import optimize
from sklearn.linear_model import LogisticRegression

SCALE = 0.8840456604957581
C_GRID = (1e4, 3e3, 1e3, 3e2, 1e2, 3e1, 1e1, 3.0, 1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3,
          1e-3, 3e-4, 1e-4)


def softmax(x):
  x = x - np.max(x, axis=1, keepdims=True)
  e = np.exp(x)
  return e / np.sum(e, axis=1, keepdims=True)


def direct(train_logits, train_labels, val_logits, val_labels):
  probs = np.concatenate([softmax(train_logits * SCALE), softmax(val_logits * SCALE)])
  labels = np.concatenate([train_labels, val_labels])
  return np.stack([probs[labels == t].mean(axis=0) for t in range(labels.max() + 1)])


def _nll(scale, logits, labels):
  z = logits * scale
  z = z - z.max(axis=1, keepdims=True)
  return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(labels)), labels]))


def reverse(train_logits, train_labels, val_logits, val_labels, *, max_iter=100_000):
  """`(R [C_t, C_s], chosen C, scale, validation accuracies in C_GRID order, nll)`:
  `nll(s)` is the calibration's objective, the validation NLL at scale s."""
  train_p, val_p = softmax(train_logits * SCALE), softmax(val_logits * SCALE)
  fits, accs = [], []
  for c in C_GRID:
    fit = LogisticRegression(C=c, fit_intercept=False, max_iter=max_iter,
                             tol=1e-10 if max_iter > 100 else 1e-4)
    fit.fit(train_p, train_labels)
    fits.append(fit)
    accs.append(np.mean(fit.predict(val_p) == val_labels))
  best = int(np.argmax(accs))  # the first best: the weakest regularisation
  coef = fits[best].coef_  # [C_t, C_s]
  val_logits_t = val_p @ coef.T
  scale = optimize.minimize_scalar(_nll, bounds=(1e-3, 1e3), method="bounded",
                                   args=(val_logits_t, val_labels),
                                   options={"xatol": 1e-10}).x
  p_t_given_s = softmax(coef.T * scale)  # [C_s, C_t]
  marginal = np.concatenate([train_p, val_p]).mean(axis=0)[:, None]  # [C_s, 1]
  joint = (p_t_given_s * marginal).T  # [C_t, C_s]
  nll = lambda s: _nll(s, val_logits_t, val_labels)
  return (joint / joint.sum(axis=1, keepdims=True), C_GRID[best], scale, np.array(accs),
          nll)
