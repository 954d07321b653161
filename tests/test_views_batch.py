"""`bitune_jax.data.views.batch` (every example's view keyed by its row: the same pixels
whatever the sharding), against independent NumPy / PIL references (`view_references`
states the tolerances), on fresh random inputs (the `rng` fixture prints its seed on
failure)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bitune_jax.data.views import augment
from bitune_jax.data.views import batch as views_batch
from view_references import CROSS_TOL, MOCO_TOL, SIDE, SIZE


_batch_views = jax.jit(views_batch.batch_views, static_argnames=("view", "size"))


def test_batch_views_same_pixels_on_one_and_eight_devices(rng):
  """The batch sharded over 8 devices == on one device == each row on its own (with its
  global row index): the pixels depend on the global row, not on the shard."""
  batch = 16
  images = rng.integers(0, 256, (batch, SIDE, SIDE, 3), dtype=np.uint8)
  rows = rng.permutation(1000)[:batch].astype(np.int32)
  seed, step = int(rng.integers(2**31)), int(rng.integers(10**6))
  call = functools.partial(_batch_views, seed=seed, step=step, view=1, size=SIZE)
  device = jax.devices()[0]
  single = call(jax.device_put(images, device), rows=jax.device_put(rows, device))
  assert single.shape == (batch, SIZE, SIZE, 3) and single.dtype == jnp.float32
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  sharded = call(jax.device_put(images, sharding), rows=jax.device_put(rows, sharding))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=CROSS_TOL,
                             rtol=0)
  for b in range(batch):
    alone = call(images[b:b + 1], rows=rows[b:b + 1])
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(single[b]),
                               atol=CROSS_TOL, rtol=0, err_msg=f"row {rows[b]}")


def test_views_differ_by_row_step_and_view_and_repeat_for_the_same_ones(rng):
  """One image in every row: rows, steps and view numbers all give different views;
  the same (seed, step, row, view) gives the same view again (a resumed run)."""
  batch = 8
  image = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
  images = np.broadcast_to(image, (batch, SIDE, SIDE, 3))
  rows = np.arange(batch, dtype=np.int32) + int(rng.integers(1000))
  seed, step = int(rng.integers(2**31)), int(rng.integers(10**6))

  def views(step=step, view=0, seed=seed, rows=rows):
    return np.asarray(_batch_views(images, seed=seed, step=step, rows=rows, view=view,
                                   size=SIZE))

  base = views()
  flat = base.reshape(batch, -1)
  for i in range(batch):
    for j in range(i):
      assert not np.array_equal(flat[i], flat[j]), (i, j)
  for other in (views(step=step + 1), views(view=1), views(seed=seed + 1)):
    for b in range(batch):
      assert not np.array_equal(other[b], base[b])
  # The same draws again, also through a fresh compilation and from the single view.
  np.testing.assert_array_equal(views(), base)
  again = jax.jit(views_batch.batch_views, static_argnames=("view", "size"))(
      images, seed=seed, step=step, rows=rows, view=0, size=SIZE)
  np.testing.assert_allclose(np.asarray(again), base, atol=CROSS_TOL, rtol=0)
  one = augment.reference_train_view(
      image, views_batch.view_key(seed, step, rows[3], 0), size=SIZE)
  np.testing.assert_allclose(np.asarray(one), base[3], atol=CROSS_TOL, rtol=0)


def _batch_moco_fn(images, hw, rows, **kwargs):
  return views_batch.batch_views(images, hw=hw, rows=rows, **kwargs)


_batch_moco = jax.jit(_batch_moco_fn, static_argnames=("view", "size", "kind"))


def test_batch_views_moco_same_pixels_on_one_and_eight_devices(rng):
  """kind="moco": sharded over 8 devices == one device == moco_view of each row with
  its view key (scale None: MoCo's (0.2, 1))."""
  batch = 16
  images = rng.integers(0, 256, (batch, SIDE, SIDE, 3), dtype=np.uint8)
  hw = rng.integers(20, 800, (batch, 2)).astype(np.int32)
  rows = rng.permutation(1000)[:batch].astype(np.int32)
  seed, step = int(rng.integers(2**31)), int(rng.integers(10**6))
  call = functools.partial(_batch_moco, seed=seed, step=step, view=0, size=SIZE,
                           kind="moco")
  device = jax.devices()[0]
  single = call(*(jax.device_put(a, device) for a in (images, hw, rows)))
  assert single.shape == (batch, SIZE, SIZE, 3) and single.dtype == jnp.float32
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  sharded = call(*(jax.device_put(a, sharding) for a in (images, hw, rows)))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=MOCO_TOL,
                             rtol=0)
  one = jax.jit(augment.moco_view, static_argnames="size")
  for b in range(batch):
    alone = one(images[b], hw[b], views_batch.view_key(seed, step, rows[b], 0), size=SIZE)
    np.testing.assert_allclose(np.asarray(alone), np.asarray(single[b]),
                               atol=MOCO_TOL, rtol=0, err_msg=f"row {rows[b]}")


def test_batch_views_rejects_unknown_kind_and_moco_without_hw():
  images = np.zeros((2, SIDE, SIDE, 3), np.uint8)
  rows = np.arange(2, dtype=np.int32)
  with pytest.raises(ValueError, match="kind"):
    views_batch.batch_views(images, seed=0, step=0, rows=rows, view=0, size=SIZE,
                            kind="simclr")
  with pytest.raises(ValueError, match="hw"):
    views_batch.batch_views(images, seed=0, step=0, rows=rows, view=0, size=SIZE,
                            kind="moco")
