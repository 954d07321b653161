"""Co-Tuning's category relationship R[C_t, C_s] = p(y_s | y_t), computed on the host.

Co-Tuning (You et al., NeurIPS 2020) trains the pre-trained source head with soft
targets `R[y_t]`. `R` is estimated once, before fine-tuning, from the source model's
eval-mode softmax outputs on the target training data, either directly (class means)
or in reverse (a calibrated logistic model of p(y_t | y_s), inverted by Bayes' rule).
Arrays in, NumPy arrays out; the numerics run in JAX/optax (L-BFGS), in float32.
Invalid inputs raise `ValueError`s that name the offending value or shape.

Against the official code (thuml/CoTuning, `module/relationship_learning.py`), whose
numbers the paper reports: the same source probabilities when the caller passes
`softmax(OFFICIAL_SOURCE_SCALE * logits)` (the papers' configs do), the same C grid and
order, the same choice (the first C of best validation accuracy), the same calibration
(the NLL-minimising scale of the chosen model's validation logits) and Bayes' rule. One
difference, on purpose: our logistic regressions are solved to convergence, where the
official ones stop at scikit-learn's default 100 L-BFGS iterations (short of the
optimum of its own objective at the weak ridges); a converged fit is the better
estimate of the model the method describes, and it does not depend on the solver's
iteration count.

Every public function here is host-side (NumPy out, a regularisation strength or a
temperature chosen on the host): called on a traced argument (under `jit`, `grad` or
`vmap`) it raises a one-line `TypeError` saying so. Inside a jitted function with
concrete (closed-over) arguments it computes at trace time, as eagerly.
"""

import functools
import inspect
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpy.typing import ArrayLike

# The official Co-Tuning code's grid, C = 1e4, 3e3, 1e3, ..., 3e-4, 1e-4 (C = 1 / l2,
# scikit-learn's inverse ridge), in its order: the weakest ridge first.
OFFICIAL_C_GRID = (1e4, 3e3, 1e3, 3e2, 1e2, 3e1, 1e1, 3.0, 1.0, 3e-1, 1e-1, 3e-2, 1e-2,
                   3e-3, 1e-3, 3e-4, 1e-4)
DEFAULT_L2_GRID = tuple(1.0 / c for c in OFFICIAL_C_GRID)  # 17 values, ascending
# The official code's source-logit scale (`softmax(s * logits)`), the calibrated inverse
# temperature of the ImageNet ResNet-50, used in both approaches; the papers' configs
# take it as `cotuning.source_temperature = 1 / OFFICIAL_SOURCE_SCALE`.
OFFICIAL_SOURCE_SCALE = 0.8840456604957581
# The calibration's range: the official code's bounds on the scale, (1e-3, 1e3).
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e3
_PROB_SUM_ATOL = 1e-2
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- checks
def _error(fn, message):
  return ValueError(f"{fn}: {message}")


def _check_matrix(fn, name, x, *, probs):
  """Float32 copy of a finite rank-2 array; with `probs`, rows must be distributions."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise _error(fn, f"{name} must have rank 2 [N, C], got shape {x.shape}")
  if x.size == 0:
    raise _error(fn, f"{name} must be non-empty, got shape {x.shape}")
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise _error(fn, f"{name} has non-finite entries, got shape {x.shape}")
  if probs:
    if x.min() < 0:
      raise _error(fn, f"{name} must be non-negative, got min {x.min():.3g} at row "
                   f"{int(np.argwhere(x < 0)[0, 0])}")
    err = np.abs(x.sum(axis=1) - 1.0)
    if err.max() > _PROB_SUM_ATOL:
      raise _error(fn, f"rows of {name} must sum to 1, row {int(err.argmax())} sums "
                   f"to {x.sum(axis=1)[err.argmax()]:.4g}")
  return x


def _check_labels(fn, name, labels, *, num_rows, num_classes):
  """Int32 copy of `labels [N]`, checked against `num_rows` and `[0, num_classes)`."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise _error(fn, f"{name} must have rank 1 [N], got shape {labels.shape}")
  if labels.shape[0] != num_rows:
    raise _error(fn, f"{name} has {labels.shape[0]} entries but the matching "
                 f"array has N = {num_rows} rows")
  if not np.issubdtype(labels.dtype, np.integer):
    raise _error(fn, f"{name} must be integers, got dtype {labels.dtype}")
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise _error(fn, f"{name}[{bad[0]}] = {labels[bad[0]]} is outside "
                 f"[0, num_classes={num_classes})")
  return labels.astype(np.int32)


def _check_num_classes(fn, num_classes):
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise _error(fn, f"num_classes must be a positive int, got {num_classes!r}")
  return int(num_classes)


def _check_every_class_present(fn, labels, num_classes):
  empty = np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0)
  if empty.size:
    raise _error(fn, f"target class {empty[0]} has no training samples; every class "
                 f"needs at least one (empty classes: {empty.tolist()})")


def _host_side(fn):
  """Refuses traced arguments of the host-side `fn` with a one-line `TypeError`; with
  concrete arguments inside a trace, computes at trace time."""
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    for name, value in signature.bind(*args, **kwargs).arguments.items():
      leaves = jax.tree_util.tree_leaves(value)
      if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        raise TypeError(f"{fn.__name__}: a host-side function (NumPy out); call it "
                        f"outside jit, grad and vmap, got a traced `{name}`")
    with jax.ensure_compile_time_eval():  # no-op eagerly; inside jit: no staged ops
      return fn(*args, **kwargs)

  return wrapper


# --------------------------------------------------------------------------- solver
def _minimize_lbfgs(fun, init, *, max_iters, tol):
  """Minimises `fun` from `init` with optax L-BFGS (zoom line search), traceable.

  Stops when the gradient norm drops below `tol`, after `max_iters` iterations, or
  when an iteration no longer moves the parameters (float32 stagnation).
  """
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def body(carry):
    params, state, _ = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(
        grad, state, params, value=value, grad=grad, value_fn=fun)
    moved = optax.tree.norm(updates) > 0
    return optax.apply_updates(params, updates), state, moved

  def keep_going(carry):
    _, state, moved = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < max_iters) & (grad_norm >= tol) & moved)

  carry = (init, opt.init(init), jnp.asarray(True))
  return jax.lax.while_loop(keep_going, body, carry)[0]


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iters"))
def _fit_logreg(features, labels, l2, tol, *, num_classes, max_iters):
  """L-BFGS fit of `W [D, C]`; the objective is the sklearn one divided by N."""
  n = features.shape[0]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)

  def objective(w):  # (sum_i CE + 0.5 l2 ||W||^2) / N: same minimiser, O(1) scale.
    log_p = jax.nn.log_softmax(jnp.dot(features, w, precision=_HIGHEST))
    return (-jnp.sum(onehot * log_p) + 0.5 * l2 * jnp.sum(w * w)) / n

  init = jnp.zeros((features.shape[1], num_classes), jnp.float32)
  return _minimize_lbfgs(objective, init, max_iters=max_iters, tol=tol)


def _mean_nll(logits, labels):
  """Mean cross-entropy of `logits [N, C]` against `labels [N]` (traceable)."""
  log_p = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))


@functools.partial(jax.jit, static_argnames=("max_iters",))
def _fit_inverse_temperature(logits, labels, lo, hi, tol, *, max_iters):
  """`beta* = argmin_beta NLL(beta * logits)`, convex in beta, clipped to [lo, hi]."""
  nll = lambda beta: _mean_nll(beta[0] * logits, labels)
  slope = lambda b: jax.grad(nll)(jnp.full((1,), b, jnp.float32))[0]

  def interior(_):  # The minimiser lies in [lo, hi] (or the NLL is flat): solve.
    init = jnp.full((1,), jnp.clip(1.0, lo, hi), jnp.float32)
    return jnp.clip(_minimize_lbfgs(nll, init, max_iters=max_iters, tol=tol)[0], lo, hi)

  # The slope is non-decreasing. Falling at lo and not rising at hi: hi (separable
  # data). Rising at hi and not falling at lo: lo. Otherwise (a minimum inside, or a
  # flat NLL, e.g. constant rows): interior. "Rising"/"falling" means beyond `tol`:
  # on separable data the slope at hi is float32 noise around 0 (+3.7e-8 measured
  # under XLA's fusion with jax 0.10), which must not count as a minimum inside.
  slope_lo, slope_hi = slope(lo), slope(hi)
  to_hi = (slope_lo < -tol) & (slope_hi <= tol)
  to_lo = (slope_lo >= -tol) & (slope_hi > tol)
  at_bound = lambda _: jnp.where(to_hi, hi, lo)
  return jax.lax.cond(to_hi | to_lo, at_bound, interior, None)


# --------------------------------------------------------------------------- public
@_host_side
def probs_from_logits(logits: ArrayLike, *, temperature: float = 1.0) -> np.ndarray:
  """Softmax of `logits [N, C] / temperature` as a float32 NumPy array `[N, C]`.

  Host-side (the module's rule): a traced argument is a one-line `TypeError`.
  """
  if not np.isfinite(temperature) or temperature <= 0:
    raise _error("probs_from_logits", f"temperature must be > 0, got {temperature}")
  logits = jnp.asarray(logits, jnp.float32)
  return np.asarray(jax.nn.softmax(logits / temperature, axis=-1))


@_host_side
def direct_relationship(*, source_probs: ArrayLike, labels: ArrayLike,
                        num_classes: int) -> np.ndarray:
  """Co-Tuning's direct relationship: R[t] = mean source distribution of class t.

  Args:
    source_probs: `[N, C_s]` eval-mode source-model softmax outputs on the target
      training data (non-negative rows summing to 1).
    labels: `[N]` integer target labels in `[0, num_classes)`.
    num_classes: C_t; every class must have at least one sample.

  Returns:
    `R [C_t, C_s]` float32, each row a distribution over the source classes (the
    class mean, renormalised so that float32 rows sum to 1).

  Host-side (the module's rule): a traced argument is a one-line `TypeError`.
  """
  fn = "direct_relationship"
  num_classes = _check_num_classes(fn, num_classes)
  probs = _check_matrix(fn, "source_probs", source_probs, probs=True)
  labels = _check_labels(fn, "labels", labels, num_rows=probs.shape[0],
                         num_classes=num_classes)
  _check_every_class_present(fn, labels, num_classes)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # [N, C_t]
  sums = jnp.dot(onehot.T, probs, precision=_HIGHEST)  # [C_t, C_s]
  rel = sums / jnp.sum(sums, axis=1, keepdims=True)  # Mean, renormalised exactly.
  return np.asarray(rel, np.float32)


@_host_side
def calibrate_temperature(logits: ArrayLike, labels: ArrayLike, *,
                          min_temperature: float = MIN_TEMPERATURE,
                          max_temperature: float = MAX_TEMPERATURE, max_iters: int = 200,
                          tol: float = 1e-7) -> float:
  """Temperature scaling: `argmin_{t>0} mean CE(softmax(logits / t), labels)`.

  The NLL is convex in beta = 1/t, so the search runs over beta in
  `[1/max_temperature, 1/min_temperature]`: if the NLL still decreases at the
  sharp end (perfectly separable data, optimum t -> 0) the result is
  `min_temperature`; if it already increases at the flat end, `max_temperature`.

  Args:
    logits: `[N, C]` held-out logits.
    labels: `[N]` integer labels in `[0, C)`.
    min_temperature, max_temperature: the clipping range, `0 < min < max`.
    max_iters, tol: L-BFGS iteration cap and gradient-norm tolerance (in beta).

  Returns:
    The optimal temperature, a finite float in `[min_temperature, max_temperature]`.

  Host-side (the module's rule): a traced argument is a one-line `TypeError`.
  """
  fn = "calibrate_temperature"
  if not 0 < min_temperature < max_temperature < np.inf:
    raise _error(fn, f"need 0 < min_temperature < max_temperature < inf, got "
                 f"{min_temperature}, {max_temperature}")
  logits = _check_matrix(fn, "logits", logits, probs=False)
  labels = _check_labels(fn, "labels", labels, num_rows=logits.shape[0],
                         num_classes=logits.shape[1])
  beta = _fit_inverse_temperature(
      jnp.asarray(logits), jnp.asarray(labels), jnp.float32(1.0 / max_temperature),
      jnp.float32(1.0 / min_temperature), jnp.float32(tol), max_iters=int(max_iters))
  return float(np.clip(1.0 / float(beta), min_temperature, max_temperature))


@_host_side
def fit_logistic_regression(features: ArrayLike, labels: ArrayLike, *, num_classes: int,
                            l2: float, max_iters: int = 1000,
                            tol: float = 1e-7) -> np.ndarray:
  """Multinomial logistic regression without intercept, solved by L-BFGS.

  Minimises `sum_i CE(softmax(x_i @ W), y_i) + 0.5 * l2 * ||W||^2`, the objective of
  scikit-learn's `LogisticRegression(C=1/l2, fit_intercept=False)` for >= 3 classes
  (for 2 classes sklearn fits one coefficient vector, a different penalty). The
  solver works on that objective divided by N (same minimiser).

  Args:
    features: `[N, D]` inputs.
    labels: `[N]` integer labels in `[0, num_classes)`.
    num_classes: C. Classes without samples are allowed (their logits are pushed down).
    l2: the ridge strength, finite and > 0.
    max_iters, tol: L-BFGS iteration cap and gradient-norm tolerance of the
      N-scaled objective.

  Returns:
    `W [D, C]` float32; logits are `features @ W`.

  Host-side (the module's rule): a traced argument is a one-line `TypeError`.
  """
  fn = "fit_logistic_regression"
  num_classes = _check_num_classes(fn, num_classes)
  if not (np.isfinite(l2) and l2 > 0):
    raise _error(fn, f"l2 must be finite and > 0, got {l2}")
  features = _check_matrix(fn, "features", features, probs=False)
  labels = _check_labels(fn, "labels", labels, num_rows=features.shape[0],
                         num_classes=num_classes)
  w = _fit_logreg(jnp.asarray(features), jnp.asarray(labels), jnp.float32(l2),
                  jnp.float32(tol), num_classes=num_classes, max_iters=int(max_iters))
  return np.asarray(w, np.float32)


def _select_l2(train_probs, train_labels, val_probs, val_labels, *, num_classes,
               l2_grid):
  """Fits every l2; returns (best index, weights, val accuracies, val NLLs)."""
  weights, accs, nlls = [], [], []
  for l2 in l2_grid:
    w = fit_logistic_regression(train_probs, train_labels, num_classes=num_classes,
                                l2=l2)
    logits = val_probs @ w
    weights.append(w)
    accs.append(float(np.mean(np.argmax(logits, axis=1) == val_labels)))
    nlls.append(float(_mean_nll(jnp.asarray(logits), jnp.asarray(val_labels))))
  # Highest accuracy, ties -> the first in grid order (the official code's argmax: with
  # the default grid, the weakest ridge).
  best = int(np.argmax(accs))
  return best, weights, np.asarray(accs), np.asarray(nlls)


@_host_side
def reverse_relationship(*, train_probs: ArrayLike, train_labels: ArrayLike,
                         val_probs: ArrayLike, val_labels: ArrayLike, num_classes: int,
                         l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                         calibrate: bool = True) -> Tuple[np.ndarray, dict]:
  """Co-Tuning's reverse relationship R[t, s] = p(y_s = s | y_t = t) via Bayes' rule.

  (a) fit p(y_t | source probs) = softmax(p_s @ W) on the train split for each l2 in
  `l2_grid`, keeping the best validation accuracy (ties -> the first in `l2_grid`);
  (b) temperature-calibrate its validation logits (T = 1 without `calibrate`);
  (c) p(y_t | y_s = s) = softmax_t(W[s] / T), the model at the one-hot input e_s;
  (d) R[t, s] ∝ p(y_t = t | y_s = s) p(y_s = s), normalised over s, with p(y_s) the
  mean source distribution over train and val.

  Args:
    train_probs: `[N_tr, C_s]` source softmax outputs on the training split.
    train_labels: `[N_tr]` target labels; every class needs a training sample.
    val_probs: `[N_val, C_s]` source softmax outputs on the validation split.
    val_labels: `[N_val]` target labels.
    num_classes: C_t.
    l2_grid: candidate ridge strengths (each finite, > 0).
    calibrate: whether to fit the temperature of step (b).

  Returns:
    `(R [C_t, C_s] float32 with rows summing to 1, info)`, with info keys `l2`
    (chosen), `temperature`, `l2_grid`, `val_accuracy` and `val_nll` (`[len(grid)]`,
    in grid order).

  Host-side (the module's rule): a traced argument is a one-line `TypeError`.
  """
  fn = "reverse_relationship"
  num_classes = _check_num_classes(fn, num_classes)
  train_probs = _check_matrix(fn, "train_probs", train_probs, probs=True)
  val_probs = _check_matrix(fn, "val_probs", val_probs, probs=True)
  if train_probs.shape[1] != val_probs.shape[1]:
    raise _error(fn, f"train_probs {train_probs.shape} and val_probs "
                 f"{val_probs.shape} disagree on the number of source classes")
  train_labels = _check_labels(fn, "train_labels", train_labels,
                               num_rows=train_probs.shape[0], num_classes=num_classes)
  val_labels = _check_labels(fn, "val_labels", val_labels,
                             num_rows=val_probs.shape[0], num_classes=num_classes)
  _check_every_class_present(fn, train_labels, num_classes)
  l2_grid = tuple(float(l2) for l2 in l2_grid)
  if not l2_grid:
    raise _error(fn, "l2_grid is empty")
  best, weights, accs, nlls = _select_l2(train_probs, train_labels, val_probs,
                                         val_labels, num_classes=num_classes,
                                         l2_grid=l2_grid)
  w = weights[best]  # [C_s, C_t]
  temp = calibrate_temperature(val_probs @ w, val_labels) if calibrate else 1.0
  log_t_given_s = jax.nn.log_softmax(jnp.asarray(w) / temp, axis=1)  # [C_s, C_t]
  marginal = np.concatenate([train_probs, val_probs]).mean(axis=0)  # [C_s]
  # log 0 = -inf for a source class with zero marginal: R[:, s] = 0 there.
  log_joint = log_t_given_s.T + jnp.log(jnp.asarray(marginal))[None, :]
  rel = jax.nn.softmax(log_joint, axis=1)  # Normalise over s, in log space.
  info = {"l2": l2_grid[best], "temperature": temp, "l2_grid": l2_grid,
          "val_accuracy": accs, "val_nll": nlls}
  return np.asarray(rel, np.float32), info
