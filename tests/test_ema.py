"""Momentum update of a key encoder and its cosine momentum schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax import ema


def _tree(rng):
  return {"conv": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32)},
          "head": {"bias": rng.standard_normal(5).astype(np.float32)}}


def test_ema_update_is_the_momentum_formula(rng):
  key, query = _tree(rng), _tree(rng)
  m = 0.999
  got = ema.ema_update(key, query, momentum=m)
  for g, k, q in zip(jax.tree.leaves(got), jax.tree.leaves(key), jax.tree.leaves(query)):
    # float64 reference; float32 rounding of terms up to |k| ~ 4 is ~ 2.4e-7 absolute
    expected = m * k.astype(np.float64) + (1 - m) * q
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-6 * np.abs(k).max())
  assert jax.tree.structure(got) == jax.tree.structure(key)
  # m = 1 freezes the key encoder; m = 0 copies the query encoder.
  for g, k in zip(jax.tree.leaves(ema.ema_update(key, query, momentum=1.0)),
                  jax.tree.leaves(key)):
    np.testing.assert_array_equal(g, k)
  for g, q in zip(jax.tree.leaves(ema.ema_update(key, query, momentum=0.0)),
                  jax.tree.leaves(query)):
    np.testing.assert_array_equal(g, q)


def test_ema_update_with_traced_momentum_from_schedule(rng):
  key, query = _tree(rng), _tree(rng)
  schedule = ema.momentum_schedule(0.99, total_steps=100)

  @jax.jit
  def step(k, q, t):
    return ema.ema_update(k, q, momentum=schedule(t))
  got = step(key, query, jnp.asarray(50))
  m = 1 - 0.01 * (math.cos(math.pi * 0.5) + 1) / 2
  k, q = key["head"]["bias"].astype(np.float64), query["head"]["bias"]
  np.testing.assert_allclose(got["head"]["bias"], m * k + (1 - m) * q, rtol=1e-6,
                             atol=1e-6 * np.abs(k).max())


def test_momentum_schedule_values():
  constant = ema.momentum_schedule(0.999)
  assert float(constant(0)) == pytest.approx(0.999) == float(constant(10 ** 6))
  cosine = ema.momentum_schedule(0.996, total_steps=1000)
  for step in (0, 250, 500, 1000, 5000):
    t = min(step, 1000) / 1000
    expected = 1 - (1 - 0.996) * (math.cos(math.pi * t) + 1) / 2
    assert float(cosine(step)) == pytest.approx(expected, abs=1e-7)
  partial = ema.momentum_schedule(0.99, total_steps=10, final_momentum=0.995)
  assert float(partial(10)) == pytest.approx(0.995, abs=1e-7)
  with pytest.raises(ValueError, match="final_momentum"):
    ema.momentum_schedule(0.99, total_steps=10, final_momentum=0.9)
  with pytest.raises(ValueError, match="base_momentum"):
    ema.momentum_schedule(1.5)


def test_momentum_schedule_accepts_its_whole_range_and_nothing_else():
  """Every boundary of the documented ranges: m0 in [0, 1], total_steps >= 1,
  final in [m0, 1]."""
  assert float(ema.momentum_schedule()(123)) == pytest.approx(0.999)  # MoCo's default
  for m0 in (0.0, 1.0):  # both ends are valid momenta
    assert float(ema.momentum_schedule(m0)(7)) == m0
  # m0 = 1 with a ramp: the key encoder is frozen, m = 1 at every step.
  frozen = ema.momentum_schedule(1.0, total_steps=10)
  assert [float(frozen(s)) for s in (0, 5, 10)] == [1.0, 1.0, 1.0]
  one_step = ema.momentum_schedule(0.9, total_steps=1)  # the shortest ramp
  assert float(one_step(0)) == pytest.approx(0.9, abs=1e-7)
  assert float(one_step(1)) == pytest.approx(1.0, abs=1e-7)
  flat = ema.momentum_schedule(0.99, total_steps=10, final_momentum=0.99)  # final = m0
  assert [float(flat(s)) for s in (0, 5, 10)] == pytest.approx([0.99] * 3, abs=1e-7)
  for m0 in (-0.01, 1.01):
    with pytest.raises(ValueError, match=rf"base_momentum must be in \[0, 1\], got {m0}"):
      ema.momentum_schedule(m0)
  with pytest.raises(ValueError, match="total_steps must be >= 1, got 0"):
    ema.momentum_schedule(0.99, total_steps=0)
  for final in (0.98, 1.01):
    with pytest.raises(ValueError, match=rf"final_momentum must be in \[base_momentum="
                       rf"0.99, 1\], got {final}"):
      ema.momentum_schedule(0.99, total_steps=10, final_momentum=final)
