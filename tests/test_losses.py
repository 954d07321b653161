"""Losses against the PyTorch transliteration of the reference loops (float64), on fresh
random inputs: values and gradients within 1e-5 relative; jit, grad, vmap; bad input."""

import re

import bituning_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bitune_jax import losses

RTOL = 1e-5


def _unit(rng, *shape):
  x = rng.standard_normal(shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _labels(rng, batch, num_classes, kind):
  if kind == "random":
    return rng.integers(0, num_classes, batch)
  if kind == "one_class":  # every query of one class: far more than K of it
    return np.full(batch, rng.integers(num_classes))
  return np.arange(batch) % num_classes  # "spread"


def _to_ref_queue(queue):
  """Ours [C, K, D] -> the reference's [D, C*K] (slot k of class c at column c*K+k)."""
  num_classes, size, dim = queue.shape
  return torch.tensor(queue.reshape(num_classes * size, dim).T.copy())


def _assert_close(actual, expected, rtol=RTOL):
  actual, expected = np.asarray(actual), np.asarray(expected)
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _grad_check(torch_loss, leaf, jax_loss, jax_arg):
  torch_loss.backward()
  _assert_close(jax_loss, torch_loss.item())
  _assert_close(jax_arg, leaf.grad.numpy())


# (C, K, B, D/F, label kind, temperature): class counts, queue sizes and temperatures
# all vary, so that a loss that ignores an argument (or hard-codes a default) fails.
CASES = [(7, 3, 12, 16, "random", 0.07), (5, 4, 9, 33, "one_class", 0.2),
         (20, 8, 16, 64, "spread", 0.5), (3, 1, 6, 8, "random", 1.3),
         (2, 5, 10, 12, "random", 0.05)]


@pytest.mark.parametrize("case", CASES)
def test_ccl_matches_reference(case, rng):
  num_classes, size, batch, dim, kind, tau = case
  z_q, z_k = _unit(rng, batch, dim), _unit(rng, batch, dim)
  queue = _unit(rng, num_classes, size, dim)
  labels = _labels(rng, batch, num_classes, kind)

  def loss_fn(zq):
    return losses.categorical_contrastive_loss(
        z_query=zq, z_key=jnp.asarray(z_k, jnp.float32),
        queue_z=jnp.asarray(queue, jnp.float32), labels=jnp.asarray(labels),
        temperature=tau)
  value, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(z_q, jnp.float32))

  leaf = torch.tensor(z_q, requires_grad=True)
  expected = ref.ccl_reference(leaf, torch.tensor(z_k), _to_ref_queue(queue),
                               torch.tensor(labels), num_classes, size, temperature=tau)
  _grad_check(expected, leaf, value, grad)


@pytest.mark.parametrize("case", CASES)
def test_cce_matches_reference(case, rng):
  num_classes, size, batch, feat, kind, tau = case
  h_q = rng.standard_normal((batch, feat)) * 3.0
  kernel = rng.standard_normal((feat, num_classes)) * 0.1
  bias = rng.standard_normal(num_classes) * 0.1
  queue = _unit(rng, num_classes, size, feat + 1)
  labels = _labels(rng, batch, num_classes, kind)

  def loss_fn(h):
    return losses.contrastive_cross_entropy_loss(
        h_query=h, head_kernel=jnp.asarray(kernel, jnp.float32),
        head_bias=jnp.asarray(bias, jnp.float32), queue_h=jnp.asarray(queue, jnp.float32),
        labels=jnp.asarray(labels), temperature=tau)
  value, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(h_q, jnp.float32))

  leaf = torch.tensor(h_q, requires_grad=True)
  expected = ref.cce_reference(leaf, torch.tensor(kernel.T.copy()), torch.tensor(bias),
                               _to_ref_queue(queue), torch.tensor(labels), num_classes,
                               size, temperature=tau)
  _grad_check(expected, leaf, value, grad)


def test_cce_head_gradient_when_not_stopped(rng):
  num_classes, size, batch, feat = 6, 4, 10, 12
  h_q = rng.standard_normal((batch, feat))
  kernel, bias = rng.standard_normal((feat, num_classes)), rng.standard_normal(num_classes)
  queue = _unit(rng, num_classes, size, feat + 1)
  labels = rng.integers(0, num_classes, batch)

  def loss_fn(k, b, stop):
    return losses.contrastive_cross_entropy_loss(
        h_query=jnp.asarray(h_q, jnp.float32), head_kernel=k, head_bias=b,
        queue_h=jnp.asarray(queue, jnp.float32), labels=jnp.asarray(labels),
        stop_gradient_head=stop)
  args = (jnp.asarray(kernel, jnp.float32), jnp.asarray(bias, jnp.float32))
  stopped = jax.jit(jax.grad(loss_fn, argnums=(0, 1)), static_argnums=2)(*args, True)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in stopped)
  value, (g_kernel, g_bias) = jax.jit(
      jax.value_and_grad(loss_fn, argnums=(0, 1)), static_argnums=2)(*args, False)

  weight = torch.tensor(kernel.T.copy(), requires_grad=True)
  b = torch.tensor(bias, requires_grad=True)
  expected = ref.cce_reference(torch.tensor(h_q), weight, b, _to_ref_queue(queue),
                               torch.tensor(labels), num_classes, size, detach_head=False)
  expected.backward()
  _assert_close(value, expected.item())
  _assert_close(g_kernel, weight.grad.numpy().T)
  _assert_close(g_bias, b.grad.numpy())


def test_info_nce_matches_reference(rng):
  batch, dim, negatives = 11, 16, 40
  q, k, queue = _unit(rng, batch, dim), _unit(rng, batch, dim), _unit(rng, negatives, dim)
  value, grad = jax.jit(jax.value_and_grad(
      lambda x: losses.info_nce_loss(query=x, key=jnp.asarray(k, jnp.float32),
                                     queue=jnp.asarray(queue, jnp.float32))))(
                                         jnp.asarray(q, jnp.float32))
  leaf = torch.tensor(q, requires_grad=True)
  expected = ref.info_nce_reference(leaf, torch.tensor(k), torch.tensor(queue.T.copy()))
  _grad_check(expected, leaf, value, grad)


@pytest.mark.parametrize("lam_kind", ["scalar", "per_example"])
def test_mixed_info_nce_matches_reference(lam_kind, rng):
  batch, dim, negatives = 9, 16, 30
  q, k_a, k_b = (_unit(rng, batch, dim) for _ in range(3))
  queue = _unit(rng, negatives, dim)
  lam = rng.uniform() if lam_kind == "scalar" else rng.uniform(size=batch)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  value, grad = jax.jit(jax.value_and_grad(
      lambda x: losses.mixed_info_nce_loss(query=x, key_a=f32(k_a), key_b=f32(k_b),
                                           lam=lam, queue=f32(queue))))(f32(q))
  leaf = torch.tensor(q, requires_grad=True)
  expected = ref.mixed_info_nce_reference(leaf, torch.tensor(k_a), torch.tensor(k_b),
                                          torch.tensor(lam), torch.tensor(queue.T.copy()))
  _grad_check(expected, leaf, value, grad)
  # lam = 1 is plain InfoNCE against key_a.
  plain = losses.info_nce_loss(query=f32(q), key=f32(k_a), queue=f32(queue))
  mixed = losses.mixed_info_nce_loss(query=f32(q), key_a=f32(k_a), key_b=f32(k_b),
                                     lam=1.0, queue=f32(queue))
  _assert_close(mixed, plain)


def test_co_tuning_loss_matches_reference(rng):
  logits = rng.standard_normal((8, 30)) * 4
  targets = rng.dirichlet(np.ones(30), size=8)
  value, grad = jax.jit(jax.value_and_grad(
      lambda x: losses.co_tuning_loss(source_logits=x,
                                      relationship_targets=jnp.asarray(targets))))(
                                          jnp.asarray(logits, jnp.float32))
  leaf = torch.tensor(logits, requires_grad=True)
  _grad_check(ref.co_tuning_reference(leaf, torch.tensor(targets)), leaf, value, grad)


def test_ccl_is_soft_cross_entropy_minus_log_k_plus_one(rng):
  """The KL's entropy term is log(K+1): a closed form independent of the loops."""
  num_classes, size, batch, dim = 4, 5, 7, 8
  z_q, z_k, queue = _unit(rng, batch, dim), _unit(rng, batch, dim), _unit(
      rng, num_classes, size, dim)
  labels = rng.integers(0, num_classes, batch)
  logits = np.concatenate([np.sum(z_q * z_k, 1)[:, None],
                           z_q @ queue.reshape(-1, dim).T], 1) / 0.07
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  pos = log_p[:, 0] + np.stack(
      [log_p[i, 1 + labels[i] * size:1 + (labels[i] + 1) * size].sum() for i in range(batch)])
  expected = np.mean(-pos / (size + 1)) - np.log(size + 1)
  got = losses.categorical_contrastive_loss(z_query=z_q, z_key=z_k, queue_z=queue,
                                            labels=jnp.asarray(labels))
  _assert_close(got, expected)


def test_queue_logits_far_above_the_own_one(rng):
  """Extreme logits (tau = 0.01: |logit| up to 100, a queue logit 200 above a query's
  own) stay finite and match the reference: the log-sum-exp is shifted by each row's
  max."""
  num_classes, size, batch, dim, tau = 3, 2, 5, 8, 0.01
  z_q = _unit(rng, batch, dim)
  queue = _unit(rng, num_classes, size, dim)
  queue[1, 0] = z_q[0]  # logit +100 for query 0, whose own logit is -100
  labels = rng.integers(0, num_classes, batch)

  def loss_fn(zq):
    return losses.categorical_contrastive_loss(
        z_query=zq, z_key=jnp.asarray(-z_q, jnp.float32),
        queue_z=jnp.asarray(queue, jnp.float32), labels=jnp.asarray(labels),
        temperature=tau)
  value, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(z_q, jnp.float32))

  leaf = torch.tensor(z_q, requires_grad=True)
  expected = ref.ccl_reference(leaf, torch.tensor(-z_q), _to_ref_queue(queue),
                               torch.tensor(labels), num_classes, size, temperature=tau)
  _grad_check(expected, leaf, value, grad)


def test_jit_and_vmap_agree_with_eager(rng):
  groups, num_classes, size, batch, dim = 3, 5, 4, 6, 8
  z_q, z_k = _unit(rng, groups, batch, dim), _unit(rng, groups, batch, dim)
  queue = _unit(rng, groups, num_classes, size, dim)
  labels = jnp.asarray(rng.integers(0, num_classes, (groups, batch)))
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

  def ccl(zq, zk, qz, y):
    return losses.categorical_contrastive_loss(z_query=zq, z_key=zk, queue_z=qz, labels=y)
  eager = np.stack([ccl(f32(z_q[g]), f32(z_k[g]), f32(queue[g]), labels[g])
                    for g in range(groups)])
  batched = jax.jit(jax.vmap(ccl))(f32(z_q), f32(z_k), f32(queue), labels)
  _assert_close(batched, eager)
  grads = jax.jit(jax.vmap(jax.grad(ccl)))(f32(z_q), f32(z_k), f32(queue), labels)
  assert grads.shape == z_q.shape and bool(jnp.all(jnp.isfinite(grads)))


def test_low_precision_inputs_compute_in_float32(rng):
  h_q = rng.standard_normal((6, 16))
  kernel, bias = rng.standard_normal((16, 4)), rng.standard_normal(4)
  queue = _unit(rng, 4, 3, 17)
  labels = jnp.asarray(rng.integers(0, 4, 6))
  args = dict(head_kernel=kernel, head_bias=bias, queue_h=queue, labels=labels)
  bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in args.items() if k != "labels"}
  low = losses.contrastive_cross_entropy_loss(h_query=jnp.asarray(h_q, jnp.bfloat16),
                                              labels=labels, **bf16)
  full = losses.contrastive_cross_entropy_loss(
      h_query=jnp.asarray(h_q, jnp.bfloat16).astype(jnp.float32), labels=labels,
      **{k: v.astype(jnp.float32) for k, v in bf16.items()})
  assert low.dtype == jnp.float32
  _assert_close(low, full)


@pytest.mark.parametrize("call, needle", [
    (lambda: losses.categorical_contrastive_loss(
        z_query=jnp.zeros((4, 8)), z_key=jnp.zeros((4, 8)), queue_z=jnp.zeros((3, 2, 9)),
        labels=jnp.zeros(4, jnp.int32)), "queue_z(3, 2, 9)"),
    (lambda: losses.categorical_contrastive_loss(
        z_query=jnp.zeros((4, 8)), z_key=jnp.zeros((4, 8)), queue_z=jnp.zeros((3, 2, 8)),
        labels=jnp.zeros(5, jnp.int32)), "labels(5,)"),
    (lambda: losses.categorical_contrastive_loss(
        z_query=jnp.zeros((4, 8)), z_key=jnp.zeros((4, 8)), queue_z=jnp.zeros((3, 2, 8)),
        labels=jnp.zeros(4)), "integers"),
    (lambda: losses.contrastive_cross_entropy_loss(
        h_query=jnp.zeros((4, 8)), head_kernel=jnp.zeros((8, 3)), head_bias=jnp.zeros(3),
        queue_h=jnp.zeros((3, 2, 8)), labels=jnp.zeros(4, jnp.int32)), "queue_h(3, 2, 8)"),
    (lambda: losses.contrastive_cross_entropy_loss(
        h_query=jnp.zeros((4, 8, 1)), head_kernel=jnp.zeros((8, 3)), head_bias=jnp.zeros(3),
        queue_h=jnp.zeros((3, 2, 9)), labels=jnp.zeros(4, jnp.int32)), "rank 2"),
    (lambda: losses.info_nce_loss(query=jnp.zeros((4, 8)), key=jnp.zeros((4, 7)),
                                  queue=jnp.zeros((10, 8))), "key(4, 7)"),
    (lambda: losses.mixed_info_nce_loss(
        query=jnp.zeros((4, 8)), key_a=jnp.zeros((4, 8)), key_b=jnp.zeros((4, 8)),
        lam=jnp.zeros(3), queue=jnp.zeros((10, 8))), "lam(3,)"),
    (lambda: losses.co_tuning_loss(source_logits=jnp.zeros((4, 8)),
                                   relationship_targets=jnp.zeros((4, 9))), "(4, 9)"),
])
def test_bad_shapes_raise_clear_errors(call, needle):
  with pytest.raises(ValueError, match=re.escape(needle)):
    jax.jit(call)()  # at trace time


def test_padded_queue_classes_take_no_part(rng):
  """Queues padded with extra class rows (to shard evenly) give the unpadded numbers."""
  num_classes, size, batch, dim, pad = 5, 3, 8, 6, 3
  z_q, z_k = _unit(rng, batch, dim), _unit(rng, batch, dim)
  queue = _unit(rng, num_classes, size, dim)
  padded = np.concatenate([queue, _unit(rng, pad, size, dim)])  # junk in the padding
  labels = jnp.asarray(rng.integers(0, num_classes, batch))
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

  def ccl(zq, qz, valid):
    return losses.categorical_contrastive_loss(z_query=zq, z_key=f32(z_k), queue_z=qz,
                                               labels=labels, num_valid_classes=valid)
  plain = jax.value_and_grad(ccl)(f32(z_q), f32(queue), None)
  masked = jax.value_and_grad(ccl)(f32(z_q), f32(padded), num_classes)
  _assert_close(masked[0], plain[0])
  _assert_close(masked[1], plain[1])
  unmasked = ccl(f32(z_q), f32(padded), None)  # the padding would change the loss
  assert abs(float(unmasked) - float(plain[0])) > 1e-4

  feat = dim - 1
  kernel, bias = f32(rng.standard_normal((feat, num_classes))), f32(rng.standard_normal(5))
  h = f32(rng.standard_normal((batch, feat)))
  cce = lambda qh: losses.contrastive_cross_entropy_loss(  # noqa: E731
      h_query=h, head_kernel=kernel, head_bias=bias, queue_h=qh, labels=labels)
  _assert_close(cce(f32(padded)), cce(f32(queue)))


# --------------------------------------------------------------------------- label rule
def _rule_cases(rng, num_classes=4, size=3, batch=10, dim=6):
  """The three label-taking losses as functions of `labels`, with their inputs."""
  z_q, z_k = _unit(rng, batch, dim), _unit(rng, batch, dim)
  queue_z = _unit(rng, num_classes, size, dim)
  h = rng.standard_normal((batch, dim))
  kernel, bias = rng.standard_normal((dim, num_classes)), rng.standard_normal(num_classes)
  queue_h = _unit(rng, num_classes, size, dim + 1)
  logits = rng.standard_normal((batch, num_classes)) * 2
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return {
      "categorical_contrastive_loss": lambda rows, y: losses.categorical_contrastive_loss(
          z_query=f32(z_q[rows]), z_key=f32(z_k[rows]), queue_z=f32(queue_z), labels=y,
          temperature=0.1),
      "contrastive_cross_entropy_loss": lambda rows, y: (
          losses.contrastive_cross_entropy_loss(
              h_query=f32(h[rows]), head_kernel=f32(kernel), head_bias=f32(bias),
              queue_h=f32(queue_h), labels=y, temperature=0.1)),
      "cross_entropy_loss": lambda rows, y: losses.cross_entropy_loss(
          logits=f32(logits[rows]), labels=y),
  }


@pytest.mark.parametrize("name", ["categorical_contrastive_loss",
                                  "contrastive_cross_entropy_loss", "cross_entropy_loss"])
def test_label_rule_unlabelled_queries_take_no_part(name, rng):
  """A negative label: the loss is the loss of the labelled queries alone (their
  mean); all unlabelled: 0."""
  fn = _rule_cases(rng)[name]
  labels = rng.integers(0, 4, 10)
  labels[[1, 4, 7]] = [-1, -5, -1]
  kept = np.flatnonzero(labels >= 0)
  full = jax.jit(lambda y: fn(np.arange(10), y))(jnp.asarray(labels))
  alone = fn(kept, jnp.asarray(labels[kept]))
  _assert_close(full, alone)
  none = jax.jit(lambda y: fn(np.arange(10), y))(jnp.full(10, -1))
  assert float(none) == 0.0


@pytest.mark.parametrize("name", ["categorical_contrastive_loss",
                                  "contrastive_cross_entropy_loss", "cross_entropy_loss"])
def test_label_rule_labels_past_the_classes(name, rng):
  """Label >= C: a named ValueError when concrete, NaN under jit, in every function."""
  fn = _rule_cases(rng)[name]
  labels = rng.integers(0, 4, 10)
  labels[3] = 4
  with pytest.raises(ValueError, match=rf"{name}: labels must be < C=4 \(a negative "
                     r"label means no label\), got 4"):
    fn(np.arange(10), jnp.asarray(labels))
  assert np.isnan(float(jax.jit(lambda y: fn(np.arange(10), y))(jnp.asarray(labels))))


def test_a_queue_pytree_where_its_keys_belong_is_named():
  from bitune_jax import queues  # pylint: disable=g-import-not-at-top
  q = queues.init_class_queues(jax.random.PRNGKey(0), num_classes=3, size=2, dim=4)
  with pytest.raises(ValueError, match=r"categorical_contrastive_loss: queue_z is a "
                     r"ClassQueues; pass its `.keys` array \(e.g. queue_z=queues.keys\)"):
    losses.categorical_contrastive_loss(z_query=jnp.ones((2, 4)), z_key=jnp.ones((2, 4)),
                                        queue_z=q, labels=jnp.zeros(2, jnp.int32))
