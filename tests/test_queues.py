"""Queues against sequential one-at-a-time references; sharded queues match unsharded."""

import bituning_reference as ref
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bitune_jax import losses, queues


def _unit(rng, *shape):
  x = rng.standard_normal(shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_init_class_queues():
  q = queues.init_class_queues(jax.random.PRNGKey(0), num_classes=6, size=4, dim=5)
  assert q.keys.shape == (6, 4, 5) and q.ptr.shape == (6,) and q.ptr.dtype == jnp.int32
  np.testing.assert_allclose(np.linalg.norm(q.keys, axis=-1), 1.0, rtol=1e-6)
  assert (q.num_classes, q.size) == (6, 4) and int(q.ptr.sum()) == 0
  with pytest.raises(ValueError, match="size"):
    queues.init_class_queues(jax.random.PRNGKey(0), num_classes=6, size=0, dim=5)


@pytest.mark.parametrize("num_classes, size, batch", [(5, 3, 8), (4, 2, 16), (10, 6, 7)])
def test_enqueue_by_class_matches_sequential(num_classes, size, batch, rng):
  """Several steps of random batches, including classes with more than K keys."""
  dim = 4
  q = queues.init_class_queues(jax.random.PRNGKey(int(rng.integers(1 << 30))),
                               num_classes=num_classes, size=size, dim=dim)
  ref_queue = torch.tensor(np.asarray(q.keys).reshape(-1, dim).T.copy())  # [D, C*K]
  ref_ptr = torch.zeros(num_classes, dtype=torch.long)
  enqueue = jax.jit(queues.enqueue_by_class)
  for _ in range(4):
    keys = _unit(rng, batch, dim)
    labels = rng.integers(0, min(num_classes, 3) if rng.uniform() < 0.5 else num_classes,
                          batch)
    q = enqueue(q, keys=jnp.asarray(keys), labels=jnp.asarray(labels))
    ref.enqueue_reference(ref_queue, ref_ptr, torch.tensor(keys), torch.tensor(labels), size)
    np.testing.assert_array_equal(np.asarray(q.keys).reshape(-1, dim).T, ref_queue.numpy())
    np.testing.assert_array_equal(np.asarray(q.ptr), ref_ptr.numpy())


def test_enqueue_rejects_bad_keys():
  q = queues.init_class_queues(jax.random.PRNGKey(0), num_classes=3, size=2, dim=4)
  with pytest.raises(ValueError, match=r"keys must be \[B, 4\]"):
    queues.enqueue_by_class(q, keys=jnp.zeros((2, 5)), labels=jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="labels"):
    queues.enqueue_by_class(q, keys=jnp.zeros((2, 4)), labels=jnp.zeros(3, jnp.int32))


@pytest.mark.parametrize("size, batch", [(10, 4), (6, 4), (3, 5)])
def test_fifo_matches_sequential(size, batch, rng):
  q = queues.init_fifo_queue(jax.random.PRNGKey(1), size=size, dim=3)
  expected, ptr = np.asarray(q.keys).copy(), 0
  for _ in range(5):
    keys = _unit(rng, batch, 3)
    q = jax.jit(queues.enqueue_fifo)(q, keys=jnp.asarray(keys))
    for key in keys:  # one at a time
      expected[ptr] = key
      ptr = (ptr + 1) % size
    np.testing.assert_array_equal(np.asarray(q.keys), expected)
    assert int(q.ptr) == ptr


def test_memory_bank_update(rng):
  size, dim, momentum = 12, 5, 0.5
  bank = queues.init_memory_bank(jax.random.PRNGKey(2), size=size, dim=dim)
  indices = np.array([3, 7, 3, 0, 11, 7])  # duplicates: the last occurrence counts
  values = _unit(rng, len(indices), dim)
  new = jax.jit(queues.update_memory_bank, static_argnames="renormalize")(
      bank, indices=jnp.asarray(indices), values=jnp.asarray(values), momentum=momentum)
  expected = np.asarray(bank.keys).copy()
  for pos in (2, 1, 3, 4, 5):  # last occurrence of each index
    i = indices[pos]
    mixed = momentum * np.asarray(bank.keys)[i] + (1 - momentum) * values[pos]
    expected[i] = mixed / np.linalg.norm(mixed)
  np.testing.assert_allclose(np.asarray(new.keys), expected, rtol=1e-6, atol=1e-7)
  raw = queues.update_memory_bank(bank, indices=jnp.asarray([4]),
                                  values=jnp.asarray(values[:1]), momentum=0.25,
                                  renormalize=False)
  np.testing.assert_allclose(raw.keys[4], 0.25 * bank.keys[4] + 0.75 * values[0], rtol=1e-6)


def test_sharded_queues_match_unsharded(rng):
  """A [C, K, D] queue sharded over classes on 8 devices: same enqueue, same losses."""
  devices = np.array(jax.devices())
  assert devices.size == 8
  mesh = Mesh(devices, ("data",))
  num_classes, size, batch, feat, dim = 16, 4, 24, 12, 8
  rngs = jax.random.split(jax.random.PRNGKey(int(rng.integers(1 << 30))))
  queue_h = queues.init_class_queues(rngs[0], num_classes=num_classes, size=size,
                                     dim=feat + 1)
  queue_z = queues.init_class_queues(rngs[1], num_classes=num_classes, size=size, dim=dim)
  batch_in = dict(
      h_q=jnp.asarray(rng.standard_normal((batch, feat)), jnp.float32),
      z_q=jnp.asarray(_unit(rng, batch, dim)), z_k=jnp.asarray(_unit(rng, batch, dim)),
      h_k=losses.append_one_and_normalize(jnp.asarray(rng.standard_normal((batch, feat)))),
      labels=jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32))
  head = dict(kernel=jnp.asarray(rng.standard_normal((feat, num_classes)), jnp.float32),
              bias=jnp.asarray(rng.standard_normal(num_classes), jnp.float32))

  def step(qh, qz, b, hd):
    def total(h_q, z_q):
      cce = losses.contrastive_cross_entropy_loss(
          h_query=h_q, head_kernel=hd["kernel"], head_bias=hd["bias"], queue_h=qh.keys,
          labels=b["labels"])
      ccl = losses.categorical_contrastive_loss(z_query=z_q, z_key=b["z_k"],
                                                queue_z=qz.keys, labels=b["labels"])
      return cce + ccl, (cce, ccl)
    (_, parts), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        b["h_q"], b["z_q"])
    qh = queues.enqueue_by_class(qh, keys=b["h_k"], labels=b["labels"])
    qz = queues.enqueue_by_class(qz, keys=b["z_k"], labels=b["labels"])
    return qh, qz, parts, grads

  plain = jax.jit(step)(queue_h, queue_z, batch_in, head)

  by_class = lambda q: queues.ClassQueues(  # noqa: E731
      keys=NamedSharding(mesh, P("data", None, None)), ptr=NamedSharding(mesh, P("data")))
  batch_sharding = jax.tree.map(
      lambda x: NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))), batch_in)
  replicated = NamedSharding(mesh, P())
  in_shardings = (by_class(queue_h), by_class(queue_z), batch_sharding, replicated)
  args = jax.device_put((queue_h, queue_z, batch_in, head), in_shardings)
  sharded = jax.jit(step, in_shardings=in_shardings,
                    out_shardings=(by_class(queue_h), by_class(queue_z), replicated,
                                   replicated))(*args)
  assert sharded[0].keys.sharding.spec == P("data", None, None)
  assert len(sharded[0].keys.addressable_shards) == 8
  assert sharded[0].keys.addressable_shards[0].data.shape == (num_classes // 8, size,
                                                               feat + 1)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # The step did write into the queues (the comparison is not of untouched inits).
  assert not np.allclose(np.asarray(sharded[1].keys), np.asarray(queue_z.keys))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(size=st.integers(1, 5), labels=st.lists(st.integers(0, 3), min_size=12,
                                                          max_size=12),
                  ptr=st.lists(st.integers(0, 4), min_size=4, max_size=4))
def test_class_write_positions_are_distinct(size, labels, ptr):
  """Each slot is written at most once (a duplicate scatter index has no defined
  winner on every backend), and every class keeps min(count, K) of its keys."""
  ptr = np.minimum(np.asarray(ptr), size - 1)
  row, slot = queues.class_write_positions(jnp.asarray(ptr, jnp.int32),
                                           jnp.asarray(labels, jnp.int32), size=size)
  kept = [(int(r), int(s)) for r, s in zip(row, slot) if r < 4]
  assert len(kept) == len(set(kept))
  counts = np.bincount(labels, minlength=4)
  assert sorted(r for r, _ in kept) == sorted(
      c for c in range(4) for _ in range(min(counts[c], size)))


def test_donated_step_updates_queue_in_place(rng):
  """Scoring against a queue and enqueueing into it, donated: no copy of the queue."""
  queue = queues.init_class_queues(jax.random.PRNGKey(3), num_classes=64, size=16, dim=32)
  z = jnp.asarray(_unit(rng, 8, 32))
  labels = jnp.asarray(rng.integers(0, 64, 8), jnp.int32)

  def step(q, z, labels):
    loss = losses.categorical_contrastive_loss(z_query=z, z_key=z, queue_z=q.keys,
                                               labels=labels)
    return queues.enqueue_by_class(q, keys=z, labels=labels), loss

  jitted = jax.jit(step, donate_argnums=0,
                   compiler_options=queues.inplace_update_compiler_options())
  hlo = jitted.lower(queue, z, labels).compile().as_text()
  assert "f32[64,16,32]{2,1,0} copy(" not in hlo
  before = queue.keys.unsafe_buffer_pointer()
  new_queue, loss = jitted(queue, z, labels)
  assert new_queue.keys.unsafe_buffer_pointer() == before
  assert np.isfinite(float(loss))
  # ptr started at 0 and no class has more than K keys: each class's first key is in slot 0.
  np.testing.assert_array_equal(np.asarray(new_queue.keys[labels[0], 0]), np.asarray(z[0]))
  # Without the option XLA:CPU copies the donated queue (documents why it exists).
  plain = jax.jit(step, donate_argnums=0).lower(
      new_queue, z, labels).compile().as_text()
  assert "f32[64,16,32]{2,1,0} copy(" in plain


# --------------------------------------------------------------------------- label rule
def _sequential_skipping(queue, ptr, keys, labels, size):
  """One key at a time, in batch order; unlabelled (< 0), out-of-range and non-finite
  keys skipped: the documented rule, in NumPy. queue [C, K, D] and ptr [C] updated."""
  for key, label in zip(keys, labels):
    if 0 <= label < queue.shape[0] and np.all(np.isfinite(key)):
      queue[label, ptr[label]] = key
      ptr[label] = (ptr[label] + 1) % size
  return queue, ptr


def test_enqueue_skips_unlabelled_out_of_range_and_non_finite_keys(rng):
  num_classes, size, dim, batch = 3, 2, 4, 12
  q = queues.init_class_queues(jax.random.PRNGKey(int(rng.integers(1 << 30))),
                               num_classes=num_classes, size=size, dim=dim)
  expected, ptr = np.asarray(q.keys).copy(), np.zeros(num_classes, np.int64)
  enqueue = jax.jit(queues.enqueue_by_class)  # under jit: label 3 is skipped, no error
  for _ in range(3):
    keys = _unit(rng, batch, dim).astype(np.float32)
    labels = rng.integers(-2, num_classes + 1, batch)  # -2, -1 and 3 included
    labels[:4] = [-1, num_classes, 0, 0]
    keys[2, 1] = np.nan  # a NaN key of class 0: must not poison the queue
    keys[5] = np.inf
    q = enqueue(q, keys=jnp.asarray(keys), labels=jnp.asarray(labels))
    expected, ptr = _sequential_skipping(expected, ptr, keys, labels, size)
    np.testing.assert_array_equal(np.asarray(q.keys), expected)
    np.testing.assert_array_equal(np.asarray(q.ptr), ptr)
  assert np.all(np.isfinite(np.asarray(q.keys)))
  # Concrete labels: a label >= C is an error, named.
  with pytest.raises(ValueError, match=r"enqueue_by_class: labels must be < C=3 \(a "
                     r"negative label means no label\), got 3"):
    queues.enqueue_by_class(q, keys=jnp.ones((2, dim)), labels=jnp.array([0, 3]))
