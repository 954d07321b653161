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


def test_ema_update_is_the_momentum_formula():
  rng = np.random.default_rng()
  key, query = _tree(rng), _tree(rng)
  m = 0.999
  got = ema.ema_update(key, query, momentum=m)
  for g, k, q in zip(jax.tree.leaves(got), jax.tree.leaves(key), jax.tree.leaves(query)):
    np.testing.assert_allclose(g, m * k + (1 - m) * q, rtol=1e-6, atol=1e-7)
  assert jax.tree.structure(got) == jax.tree.structure(key)
  # m = 1 freezes the key encoder; m = 0 copies the query encoder.
  for g, k in zip(jax.tree.leaves(ema.ema_update(key, query, momentum=1.0)),
                  jax.tree.leaves(key)):
    np.testing.assert_array_equal(g, k)
  for g, q in zip(jax.tree.leaves(ema.ema_update(key, query, momentum=0.0)),
                  jax.tree.leaves(query)):
    np.testing.assert_array_equal(g, q)


def test_ema_update_with_traced_momentum_from_schedule():
  rng = np.random.default_rng()
  key, query = _tree(rng), _tree(rng)
  schedule = ema.momentum_schedule(0.99, total_steps=100)

  @jax.jit
  def step(k, q, t):
    return ema.ema_update(k, q, momentum=schedule(t))
  got = step(key, query, jnp.asarray(50))
  m = 1 - 0.01 * (math.cos(math.pi * 0.5) + 1) / 2
  np.testing.assert_allclose(got["head"]["bias"],
                             m * key["head"]["bias"] + (1 - m) * query["head"]["bias"],
                             rtol=1e-6)


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
