"""The kernel the two Bi-tuning losses share (`losses.categorical_contrastive_loss`,
`losses.contrastive_cross_entropy_loss`): each query's candidates scored in one matmul
against the per-class queue, and the KL between the uniform target over its own
candidate and its class's K slots and the softmax over all 1 + C*K, with the gradient
written out (`custom_jvp`) so that the backward pass is one elementwise pass.

Float32 throughout, the matmul at `Precision.HIGHEST` (see `bitune_jax.losses`).
"""

import functools
import math
from typing import Optional

import jax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
_F32 = jnp.float32


def labelled_mean(per_query: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Mean of `per_query [B]` over the labelled queries (label >= 0); NaN if any label
  is >= num_classes (the module's label rule)."""
  labelled = labels >= 0
  total = jnp.sum(jnp.where(labelled, per_query, 0.0))
  mean = total / jnp.maximum(jnp.sum(labelled), 1)
  return jnp.where(jnp.any(labels >= num_classes), jnp.nan, mean)


def soft_class_kl(own_logits: jax.Array, queue_logits: jax.Array, labels: jax.Array, *,
                  size: int, num_valid: Optional[int] = None) -> jax.Array:
  """KL(uniform over {own, K slots of own class} || softmax over 1 + C*K), batch mean.

  Args:
    own_logits: `[B]` logit of each query's own candidate (already / temperature).
    queue_logits: `[B, C*K]` logits of every queue slot (class-major) for every query.
    labels: `[B]` int class of each query.
    size: K, slots per class.
    num_valid: classes `>= num_valid` are padding (e.g. to shard the class axis evenly)
      and take no part; None: all are real.

  Returns:
    Scalar `mean_b [logsumexp_b - mean_{positives} logit - log(K + 1)]`, which is
    PyTorch's `KLDivLoss(reduction='batchmean')(log_softmax(logits), target)`; the mean
    is over the labelled queries (the module's label rule).
  """
  num_classes = num_valid if num_valid is not None else queue_logits.shape[1] // size
  per_query = _class_kl_rows(own_logits, queue_logits, labels, size, num_classes)
  return labelled_mean(per_query, labels, num_classes)


def _valid_slots(queue_logits, size, num_valid):
  """`queue_logits [B, C'*K]` with the padding classes' slots (`>= num_valid`) at -inf."""
  if num_valid * size == queue_logits.shape[1]:
    return queue_logits
  slot_class = jnp.arange(queue_logits.shape[1]) // size  # [C'*K]
  return jnp.where(slot_class[None, :] < num_valid, queue_logits, -jnp.inf)


def _candidates_logsumexp(own_logits, queue_logits):
  """Log-sum-exp `[B]` over each query's 1 + C*K candidates, stabilised by its max."""
  peak = jnp.maximum(own_logits, jnp.max(queue_logits, axis=1))  # [B]
  total = jnp.exp(own_logits - peak) + jnp.sum(
      jnp.exp(queue_logits - peak[:, None]), axis=1)  # [B]
  return peak + jnp.log(total)


def _class_kl_rows_and_lse(own_logits, queue_logits, labels, size, num_valid):
  """Per-query KL `[B]` and log-sum-exp `[B]`: one pass over `[B, C*K]`, a gather of
  B*K."""
  batch, num_slots = queue_logits.shape
  queue_logits = _valid_slots(queue_logits, size, num_valid)
  lse = _candidates_logsumexp(own_logits, queue_logits)  # [B]
  # Positives: the own candidate and the K slots of the query's class, gathered (B*K
  # reads; unlabelled queries read class 0 and are out of the mean).
  safe = jnp.clip(labels, 0, num_valid - 1)
  in_class = jnp.take_along_axis(queue_logits.reshape(batch, num_slots // size, size),
                                 safe[:, None, None], axis=1)  # [B, 1, K]
  pos = own_logits + jnp.sum(in_class, axis=(1, 2))  # [B]
  per_query = lse - pos / (size + 1) - math.log(size + 1)  # [B]
  return per_query, lse


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _class_kl_rows(own_logits, queue_logits, labels, size, num_valid):
  """`[B]` KL of each query (see `soft_class_kl`); `labels` in [0, num_valid) count."""
  return _class_kl_rows_and_lse(own_logits, queue_logits, labels, size, num_valid)[0]


@functools.partial(_class_kl_rows.defjvp, symbolic_zeros=True)
def _class_kl_rows_jvp(size, num_valid, primals, tangents):
  """d KL = (softmax - target) . d logits. Written out so that the backward pass is one
  elementwise pass from the logits (the target a mask fused into it, the softmax
  recomputed there) and nothing over `[B, C*K]` is built for a constant queue (CCE)."""
  own_logits, queue_logits, labels = primals
  d_own, d_queue, _ = tangents
  per_query, lse = _class_kl_rows_and_lse(own_logits, queue_logits, labels, size,
                                          num_valid)
  target = 1.0 / (size + 1)
  d_per_query = jnp.zeros_like(per_query)
  if not isinstance(d_own, SymbolicZero):
    d_per_query += (jnp.exp(own_logits - lse) - target) * d_own
  if not isinstance(d_queue, SymbolicZero):
    slot_class = jnp.arange(queue_logits.shape[1]) // size  # [C*K]
    safe = jnp.clip(labels, 0, num_valid - 1)
    prob = jnp.exp(_valid_slots(queue_logits, size, num_valid) - lse[:, None])
    coef = prob - jnp.where(slot_class[None, :] == safe[:, None], target, 0.0)
    d_per_query += jnp.sum(coef * d_queue, axis=1)  # [B]
  return per_query, d_per_query


def score_queue(scaled_query: jax.Array, queue: jax.Array) -> jax.Array:
  """`[B, X] x [C, K, X] -> [B, C*K]`: every slot against one vector per query.

  Measured on XLA:CPU this layout (rows = queries) with the temperature folded into the
  small operand runs ~1.4x faster than `[C*K, B]` logits divided afterwards.
  """
  num_classes, size, dim = queue.shape
  flat = queue.reshape(num_classes * size, dim).astype(_F32)  # C is major: no copy
  return jnp.einsum("bx,nx->bn", scaled_query, flat, precision=_HIGHEST)
