"""Loss functions of Bi-tuning, Co-Tuning and MoCo-style unsupervised fine-tuning.

Pure functions of arrays with keyword-only arguments: they know nothing of modules,
configs or train states, and they jit, grad and vmap. Inputs may be any float dtype;
everything inside (dot products, logits divided by a temperature, log-sum-exps and the
loss) is float32, with the dot products at `Precision.HIGHEST` so that TPUs and GPUs
(bf16 passes / TF32 by default) give the numbers a CPU gives.

Labels, one rule for every function that takes them (`queues.enqueue_by_class` too):
  * a negative label means "no label": that query takes no part in the loss (the mean
    is over the labelled queries; 0 when there are none) and its key is not enqueued;
  * a label >= C is an error: `ValueError` when the labels are concrete (also a
    constant closed over by a jitted function); when they are traced (a `jit`
    argument, `vmap`) the loss is NaN, so training stops at its NaN check, and the key
    is not enqueued;
  * a Python list or tuple of ints is accepted (converted with `jnp.asarray`).
A temperature <= 0 (or NaN) is a `ValueError` when concrete; a traced one is unchecked.

Papers:
  * Bi-tuning (Zhong et al.): CCE, Eq. (3); CCL, Eq. (4); total, Eq. (5).
  * MoCo (He et al.): InfoNCE, Eq. (1) of the Bi-tuning paper.
  * Unsupervised fine-tuning (Eq. 6): InfoNCE of a CutMix-mixed query against both
    parents' keys, weighted by the mixing ratio.
  * Co-Tuning (You et al.): soft cross-entropy of the source head against R[y_t].
  * FixMatch (Sohn et al.): the masked pseudo-label cross-entropy `l_u`.

Cost. Both Bi-tuning losses score candidates against ONE vector per query (the query's
own projection for CCL; its class's normalised weight for CCE), so the work is a
single `[B, X] @ [X, C*K]` matmul per loss. The reference implementation scores every
class's weight against every queue slot (`[C*K, F+1] @ [F+1, C]`) and then picks the
B columns it needs; for C = 1000 that is ~4x the FLOPs at B = 256 and ~20x at B = 48.
The queue is read in its stored layout (no transpose of the largest array in the step).
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bitune_jax import class_kl

_HIGHEST = jax.lax.Precision.HIGHEST
_F32 = jnp.float32


# --------------------------------------------------------------------------- helpers
def l2_normalize(x: ArrayLike, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """`x / max(||x||, eps)` along `axis` (PyTorch's `F.normalize`); safe gradient at 0."""
  sum_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))


def append_one_and_normalize(h: ArrayLike) -> jax.Array:
  """`normalize([h, 1])`: the CCE's augmented feature. `h [..., F]` -> `[..., F+1]`.

  This is what a Bi-tuning key encoder enqueues into `queue_h` and what
  `contrastive_cross_entropy_loss` computes from its raw `h_query`.
  """
  h = h.astype(_F32)
  ones = jnp.ones(h.shape[:-1] + (1,), _F32)
  return l2_normalize(jnp.concatenate([h, ones], axis=-1))


def _shape_error(fn, message, **arrays):
  shapes = ", ".join(f"{name}{tuple(jnp.shape(a))}" for name, a in arrays.items())
  return ValueError(f"{fn}: {message}; got {shapes}")


def _check_rank(fn, name, x, rank):
  if hasattr(x, "keys") and hasattr(x, "ptr"):  # a queue pytree, not its array
    raise ValueError(f"{fn}: {name} is a {type(x).__name__}; pass its `.keys` array "
                     f"(e.g. {name}=queues.keys)")
  if jnp.ndim(x) != rank:
    raise _shape_error(fn, f"{name} must have rank {rank}", **{name: x})


def _check_ranks(fn, **arrays):
  """`_check_rank` of each `name=(array, rank)`, in order."""
  for name, (x, rank) in arrays.items():
    _check_rank(fn, name, x, rank)


def _known(x):
  """NumPy value of `x` when it is known without staging an operation, else None.

  A Tracer's value is unknown (a `jit` argument, `vmap`, `grad`). A `jax.Array` closed
  over by a jitted function is not a Tracer: `np.asarray` reads it from the device
  without adding anything to the trace (a `jnp` op on it would be staged).
  """
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x)):
    return None
  return np.asarray(x)


def _check_temperature(fn, temperature):
  """A concrete temperature must be > 0 (NaN too is refused); a traced one is free."""
  known = _known(temperature)
  if known is not None and not np.all(known > 0):
    raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")


def check_labels(fn: str, labels: ArrayLike, batch: int,
                 num_classes: int) -> jax.Array:
  """Rank, dtype and length of `labels`; labels >= `num_classes` refused when concrete
  (the module's label rule), also inside `jit` when they are a closed-over constant.

  Returns:
    `labels` as an array: a Python list or tuple converted with `jnp.asarray`.
  """
  known = _known(labels)  # read before the conversion, which jit would stage
  if isinstance(labels, (list, tuple)):
    labels = jnp.asarray(labels)
  _check_rank(fn, "labels", labels, 1)
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"{fn}: labels must be integers, got dtype {jnp.result_type(labels)}")
  if labels.shape[0] != batch:
    raise _shape_error(fn, f"labels must have one entry per query (B={batch})",
                       labels=labels)
  if known is not None and known.size:
    top = int(known.max())
    if top >= num_classes:
      raise ValueError(f"{fn}: labels must be < C={num_classes} (a negative label means "
                       f"no label), got {top}")
  return labels


# --------------------------------------------------------------------------- Bi-tuning
def categorical_contrastive_loss(*, z_query: ArrayLike, z_key: ArrayLike,
                                 queue_z: ArrayLike, labels: ArrayLike,
                                 temperature: float = 0.07,
                                 num_valid_classes: Optional[int] = None) -> jax.Array:
  """Categorical contrastive loss (CCL) on the projector head, Bi-tuning Eq. (4).

  For query i of class c the candidates are its own key, then every queue slot
  (1 + C*K, class-major); the target is uniform over its own key and the K slots of
  class c; the loss is KL(target || softmax(logits / temperature)), batch mean.

  Args:
    z_query: `[B, D]` unit-norm query projections (normalised by the caller).
    z_key: `[B, D]` unit-norm key projections from the momentum encoder.
    queue_z: `[C, K, D]` per-class key queue.
    labels: `[B]` int class of each query; negative: no label (not in the mean); >= C:
      an error (ValueError when concrete, NaN under jit), the module's label rule.
    temperature: softmax temperature tau.
    num_valid_classes: queue classes `>= num_valid_classes` are padding (to shard the
      class axis evenly over devices) and are not candidates; None: all are real.

  Returns:
    Scalar float32 loss.
  """
  fn = "categorical_contrastive_loss"
  _check_ranks(fn, z_query=(z_query, 2), z_key=(z_key, 2), queue_z=(queue_z, 3))
  if z_key.shape != z_query.shape or queue_z.shape[-1] != z_query.shape[-1]:
    raise _shape_error(fn, "z_query [B,D], z_key [B,D] and queue_z [C,K,D] must agree",
                       z_query=z_query, z_key=z_key, queue_z=queue_z)
  labels = check_labels(fn, labels, z_query.shape[0],
                        num_valid_classes or queue_z.shape[0])
  _check_temperature(fn, temperature)

  zq = z_query.astype(_F32) / temperature
  own = jnp.sum(zq * z_key.astype(_F32), axis=-1)  # [B]
  queue_logits = class_kl.score_queue(zq, queue_z)  # [B, C*K]
  return class_kl.soft_class_kl(own, queue_logits, labels, size=queue_z.shape[1],
                        num_valid=num_valid_classes)


def contrastive_cross_entropy_loss(*, h_query: ArrayLike, head_kernel: ArrayLike,
                                   head_bias: ArrayLike, queue_h: ArrayLike,
                                   labels: ArrayLike, temperature: float = 0.07,
                                   stop_gradient_head: bool = True) -> jax.Array:
  """Contrastive cross-entropy (CCE) on the classifier head, Bi-tuning Eq. (3).

  For query i of class c, every candidate (the query itself, then every queue slot,
  1 + C*K) is scored against its class prototype `w_c = normalize([W[:, c], b[c]])`;
  the target is uniform over the query and the K slots of class c; the loss is
  KL(target || softmax(scores / temperature)), batch mean. Only the batch's classes
  are scored: `[C*K, F+1] @ [F+1, B]`.

  Args:
    h_query: `[B, F]` raw pooled backbone features (this function appends a constant
      1 and L2-normalises).
    head_kernel: `[F, C]` classifier kernel (Flax Dense layout).
    head_bias: `[C]` classifier bias.
    queue_h: `[C', K, F+1]` per-class queue of `normalize([h_key, 1])`; C' >= C,
      rows `>= C` being padding (to shard the class axis evenly) that takes no part.
    labels: `[B]` int class of each query; negative: no label (not in the mean); >= C:
      an error (ValueError when concrete, NaN under jit), the module's label rule.
    temperature: softmax temperature tau.
    stop_gradient_head: no gradient into the head through the prototypes (the
      reference uses `.data` of the head's weights).

  Returns:
    Scalar float32 loss.
  """
  fn = "contrastive_cross_entropy_loss"
  _check_ranks(fn, h_query=(h_query, 2), head_kernel=(head_kernel, 2),
               head_bias=(head_bias, 1), queue_h=(queue_h, 3))
  feat, num_classes = head_kernel.shape
  if (h_query.shape[1] != feat or head_bias.shape[0] != num_classes
      or queue_h.shape[0] < num_classes or queue_h.shape[2] != feat + 1):
    raise _shape_error(
        fn, "need h_query [B,F], head_kernel [F,C], head_bias [C], queue_h [C',K,F+1] "
        "with C' >= C",
        h_query=h_query, head_kernel=head_kernel, head_bias=head_bias, queue_h=queue_h)
  labels = check_labels(fn, labels, h_query.shape[0], num_classes)
  _check_temperature(fn, temperature)

  # Class prototype of each query, [B, F+1]: only the batch's columns of the head.
  safe = jnp.clip(labels, 0, num_classes - 1)  # unlabelled queries: out of the mean
  w = jnp.concatenate([jnp.take(head_kernel, safe, axis=1).T,
                       jnp.take(head_bias, safe)[:, None]], axis=1).astype(_F32)
  w = l2_normalize(w)
  if stop_gradient_head:
    w = jax.lax.stop_gradient(w)
  w = w / temperature
  hq = append_one_and_normalize(h_query)  # [B, F+1]
  own = jnp.sum(hq * w, axis=-1)  # [B]
  queue_logits = class_kl.score_queue(w, queue_h)  # [B, C*K]
  return class_kl.soft_class_kl(own, queue_logits, labels, size=queue_h.shape[1],
                        num_valid=num_classes)


# --------------------------------------------------------------------------- MoCo
def _info_nce_parts(fn, query, keys, queue, temperature):
  """Positive logits `[B]` per key in `keys` and the negatives' log-sum-exp `[B]`."""
  _check_temperature(fn, temperature)
  _check_rank(fn, "query", query, 2)
  _check_rank(fn, "queue", queue, 2)
  for name, key in keys.items():
    _check_rank(fn, name, key, 2)
    if key.shape != query.shape:
      raise _shape_error(fn, f"{name} must have the shape of query",
                         query=query, **{name: key})
  if queue.shape[1] != query.shape[1]:
    raise _shape_error(fn, "queue [N,D] and query [B,D] must agree",
                       query=query, queue=queue)
  q = query.astype(_F32)
  pos = {name: jnp.sum(q * key.astype(_F32), axis=-1) / temperature
         for name, key in keys.items()}  # [B] each
  neg = jnp.einsum("nd,bd->nb", queue.astype(_F32), q, precision=_HIGHEST) / temperature
  return pos, jax.nn.logsumexp(neg, axis=0)  # [B]


def info_nce_loss(*, query: ArrayLike, key: ArrayLike, queue: ArrayLike,
                  temperature: float = 0.2) -> jax.Array:
  """MoCo's InfoNCE, Eq. (1): cross-entropy of the positive key among 1 + N candidates.

  Args:
    query: `[B, D]` unit-norm queries.
    key: `[B, D]` unit-norm positive keys.
    queue: `[N, D]` negative keys.
    temperature: softmax temperature tau (MoCo v2: 0.2).

  Returns:
    Scalar float32 loss, batch mean.
  """
  pos, lse_neg = _info_nce_parts("info_nce_loss", query, {"key": key}, queue,
                                 temperature)
  pos = pos["key"]
  return jnp.mean(jnp.logaddexp(pos, lse_neg) - pos)


def mixed_info_nce_loss(*, query: ArrayLike, key_a: ArrayLike, key_b: ArrayLike,
                        lam: ArrayLike, queue: ArrayLike,
                        temperature: float = 0.2) -> jax.Array:
  """InfoNCE of a CutMix-mixed query, unsupervised fine-tuning Eq. (6).

  `loss = lam * InfoNCE(q_m, k_a) + (1 - lam) * InfoNCE(q_m, k_b)`, each against the
  same negatives; lam is the area of the first image in the mix.

  Args:
    query: `[B, D]` unit-norm projections of the mixed queries.
    key_a: `[B, D]` unit-norm keys of the first parents.
    key_b: `[B, D]` unit-norm keys of the second parents.
    lam: scalar or `[B]` mixing ratio (weight of `key_a`).
    queue: `[N, D]` negative keys.
    temperature: softmax temperature tau.

  Returns:
    Scalar float32 loss, batch mean.
  """
  fn = "mixed_info_nce_loss"
  lam = jnp.asarray(lam, _F32)
  if lam.ndim > 1 or (lam.ndim == 1 and lam.shape[0] != query.shape[0]):
    raise _shape_error(fn, "lam must be a scalar or have shape [B]", query=query, lam=lam)
  pos, lse_neg = _info_nce_parts(fn, query, {"key_a": key_a, "key_b": key_b}, queue,
                                 temperature)
  nll_a = jnp.logaddexp(pos["key_a"], lse_neg) - pos["key_a"]  # [B]
  nll_b = jnp.logaddexp(pos["key_b"], lse_neg) - pos["key_b"]  # [B]
  return jnp.mean(lam * nll_a + (1.0 - lam) * nll_b)


# --------------------------------------------------------------------------- Co-Tuning
def co_tuning_loss(*, source_logits: ArrayLike,
                   relationship_targets: ArrayLike) -> jax.Array:
  """Co-Tuning's soft cross-entropy of the source head: `mean_b -sum t log_softmax(s)`.

  Args:
    source_logits: `[B, C_s]` logits of the pre-trained (source) head.
    relationship_targets: `[B, C_s]` soft targets, `R[y_t]` (rows of p(y_s | y_t)).

  Returns:
    Scalar float32 loss.
  """
  fn = "co_tuning_loss"
  _check_rank(fn, "source_logits", source_logits, 2)
  if jnp.shape(relationship_targets) != source_logits.shape:
    raise _shape_error(fn, "relationship_targets must have the shape of source_logits",
                       source_logits=source_logits,
                       relationship_targets=relationship_targets)
  log_p = jax.nn.log_softmax(source_logits.astype(_F32), axis=-1)
  return -jnp.mean(jnp.sum(relationship_targets.astype(_F32) * log_p, axis=-1))


def cross_entropy_loss(*, logits: ArrayLike, labels: ArrayLike) -> jax.Array:
  """Plain cross-entropy with integer labels, mean over the labelled queries.

  Args:
    logits: `[B, C]`.
    labels: `[B]` int in [0, C); negative: no label (not in the mean); >= C: an error
      (ValueError when concrete, NaN under jit), the module's label rule.

  Returns:
    Scalar float32 loss.
  """
  fn = "cross_entropy_loss"
  _check_rank(fn, "logits", logits, 2)
  num_classes = logits.shape[1]
  labels = check_labels(fn, labels, logits.shape[0], num_classes)
  log_p = jax.nn.log_softmax(logits.astype(_F32), axis=-1)
  safe = jnp.clip(labels, 0, num_classes - 1)
  nll = -jnp.take_along_axis(log_p, safe[:, None], axis=-1)[:, 0]  # [B]
  return class_kl.labelled_mean(nll, labels, num_classes)


def fixmatch_loss(*, logits_weak: ArrayLike, logits_strong: ArrayLike,
                  threshold: float = 0.95, valid: Optional[ArrayLike] = None
                  ) -> tuple[jax.Array, jax.Array]:
  """FixMatch's unlabelled term `l_u` (Sohn et al., 2020): the cross-entropy of the
  strong view's prediction against the weak view's pseudo-label, where the weak view is
  confident enough, averaged over ALL unlabelled examples.

  `l_u = 1 / (mu B) sum_b 1[max_c q_bc >= tau] H(argmax_c q_b, softmax(logits_strong_b))`
  with `q = softmax(stop_gradient(logits_weak))`.

  Args:
    logits_weak: `[U, C]` logits of the weakly augmented views (no gradient).
    logits_strong: `[U, C]` logits of the strongly augmented views.
    threshold: tau, the confidence a pseudo-label needs (0.95 in FixMatch); may be
      traced (a `jit` argument); checked to lie in [0, 1] when concrete.
    valid: optional `[U]` bool, examples to count (padding: False); default all.

  Returns:
    `(loss, mask_rate)`: the scalar float32 loss and the fraction of (valid) examples
    whose pseudo-label passed the threshold.
  """
  fn = "fixmatch_loss"
  _check_rank(fn, "logits_weak", logits_weak, 2)
  _check_rank(fn, "logits_strong", logits_strong, 2)
  if logits_weak.shape != logits_strong.shape:
    raise _shape_error(fn, "need logits_weak and logits_strong of one shape [U, C]",
                       logits_weak=logits_weak, logits_strong=logits_strong)
  known = _known(threshold)
  if known is not None and not np.all((known >= 0.0) & (known <= 1.0)):
    raise ValueError(f"{fn}: threshold must be in [0, 1], got {threshold}")
  weak = jax.nn.softmax(jax.lax.stop_gradient(logits_weak).astype(_F32), axis=-1)
  confidence, pseudo = jnp.max(weak, axis=-1), jnp.argmax(weak, axis=-1)  # [U]
  keep = confidence >= threshold
  count = jnp.float32(logits_weak.shape[0])
  if valid is not None:
    keep = keep & valid
    count = jnp.sum(valid.astype(_F32))
  log_p = jax.nn.log_softmax(logits_strong.astype(_F32), axis=-1)
  nll = -jnp.take_along_axis(log_p, pseudo[:, None], axis=-1)[:, 0]  # [U]
  count = jnp.maximum(count, 1.0)
  loss = jnp.sum(jnp.where(keep, nll, 0.0)) / count
  return loss, jnp.sum(keep.astype(_F32)) / count
