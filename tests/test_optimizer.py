"""The optimiser, its schedules and the key-encoder momentum, against independent
references: `torch.optim.SGD` (nesterov, coupled weight decay, one param group per
parameter group), closed forms of the step and cosine schedules, the BYOL cosine
momentum ramp inside real Bi-tuning steps, and the paper's queue size per sampling
rate."""

import math
import os
import sys

import jax
import numpy as np
import pytest
import torch

from bitune_jax import sharding
from bitune_jax.methods import base, bituning, common
from bitune_jax.training import loop
import fakes  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import bituning as bituning_config  # noqa: E402  pylint: disable=g-import-not-at-top

# The reference's per-group learning-rate multipliers (DESIGN.md).
MULT = {"backbone": 0.1, "head": 1.0, "projector": 0.1}
SEEDS = (0, 1)


def _paper_config(**overrides):
  """The paper's optimiser settings (lr 0.01, SGD nesterov 0.9, weight decay 5e-4)."""
  config = bituning_config.get_config("cub,resnet50,25")
  for key, value in overrides.items():
    config[key] = value
  return config


def _tree(rng):
  """A small parameter tree with the three Bi-tuning groups (float32, like params)."""
  shapes = {"backbone": {"conv": {"kernel": (3, 3, 2, 4)}, "bn": {"scale": (4,)}},
            "head": {"dense": {"kernel": (4, 5), "bias": (5,)}},
            "projector": {"out": {"kernel": (4, 3), "bias": (3,)}}}
  return jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _step_lr(step, *, lr, total, decay_at=(0.6, 0.9), factor=0.1):
  """x factor once the step (0-based count of updates done) reaches int(f * T)."""
  return lr * factor ** sum(step >= int(f * total) for f in decay_at)


def _cosine_lr(step, *, lr, total):
  return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _torch_sgd(params, config):
  """Float64 torch parameters per group and `torch.optim.SGD` with one param group
  per parameter group (lr set each step)."""
  tensors = {g: [torch.tensor(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)]
             for g, tree in params.items()}
  groups = [dict(params=tensors[g], lr=MULT[g] * config.lr, name=g) for g in tensors]
  opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                        nesterov=config.nesterov, weight_decay=config.weight_decay)
  return tensors, opt


@pytest.mark.parametrize("seed", SEEDS)
def test_updates_equal_torch_sgd_across_the_step_decays(seed):
  """Every update over T = 10 steps (decays at steps 6 and 9): the first two updates
  of the paper's optimiser, then the steps around both boundaries."""
  total = 10
  config = _paper_config(total_steps=total)
  rng = np.random.default_rng(seed)
  params = _tree(rng)
  tx = common.make_optimizer(config)
  opt_state = tx.init(params)
  tensors, opt = _torch_sgd(params, config)
  update = jax.jit(tx.update)
  for step in range(total + 1):
    grads = _tree(rng)
    for group in opt.param_groups:
      group["lr"] = MULT[group["name"]] * _step_lr(step, lr=config.lr, total=total)
      for p, g in zip(group["params"], jax.tree.leaves(grads[group["name"]])):
        p.grad = torch.tensor(np.asarray(g, np.float64))
    before = {g: [p.detach().clone() for p in ps] for g, ps in tensors.items()}
    opt.step()
    updates, opt_state = update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    for g in tensors:
      want = [(a - b).numpy() for a, b in zip(tensors[g], before[g])]
      got = jax.tree.leaves(updates[g])
      scale = max(np.abs(w).max() for w in want)
      for name, (w, u) in enumerate(zip(want, got)):
        np.testing.assert_allclose(
            u, w, rtol=1e-6, atol=1e-6 * scale,
            err_msg=f"seed {seed}, update {step}, group {g}, leaf {name}")


@pytest.mark.parametrize("total", [10, 97, 10_000])
def test_step_schedule_around_its_boundaries(total):
  config = _paper_config(total_steps=total)
  schedule = common.learning_rate_schedule(config)
  boundaries = [int(0.6 * total), int(0.9 * total)]
  steps = sorted({0, total - 1, total} | {b + d for b in boundaries for d in (-1, 0, 1)})
  for step in steps:
    want = _step_lr(step, lr=0.01, total=total)
    assert float(schedule(step)) == pytest.approx(want, rel=1e-6), (total, step, want)
  # The decays really are at the boundaries: 0.01 -> 0.001 -> 0.0001.
  assert [float(schedule(b - 1)) / float(schedule(b)) for b in boundaries] == \
      pytest.approx([10.0, 10.0], rel=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_cosine_schedule_closed_form(seed):
  total = 1000
  config = _paper_config(total_steps=total, schedule="cosine")
  schedule = common.learning_rate_schedule(config)
  rng = np.random.default_rng(seed)
  steps = [0, 1, total // 4, total // 2, total - 1, total, total + 7,
           *rng.integers(0, total, size=5).tolist()]
  for step in steps:
    want = _cosine_lr(step, lr=0.01, total=total)
    assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), (
        f"seed {seed}, step {step}")
  assert float(schedule(total // 2)) == pytest.approx(0.005, rel=1e-6)


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_learning_rate_applied_per_group_at_each_step(schedule):
  """With momentum 0 and weight decay 0 the update is `-mult_group * lr(step) * grad`:
  the rate the optimiser really applies, step by step across the decays."""
  total, seed = 20, 3
  config = _paper_config(total_steps=total, schedule=schedule, momentum=0.0,
                         weight_decay=0.0)
  lr = {"step": lambda s: _step_lr(s, lr=0.01, total=total),
        "cosine": lambda s: _cosine_lr(s, lr=0.01, total=total)}[schedule]
  rng = np.random.default_rng(seed)
  params = _tree(rng)
  tx = common.make_optimizer(config)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(total):
    grads = _tree(rng)
    updates, opt_state = update(grads, opt_state, params)
    for g in MULT:
      for u, grad in zip(jax.tree.leaves(updates[g]), jax.tree.leaves(grads[g])):
        np.testing.assert_allclose(
            u, -MULT[g] * lr(step) * grad.astype(np.float64), rtol=1e-5,
            atol=1e-12, err_msg=f"seed {seed}, {schedule}, step {step}, group {g}")


# --------------------------------------------------------------------------- momentum
def _momentum_ramp(step, *, base, total):
  """BYOL: m_t = 1 - (1 - m0) * (cos(pi * t / T) + 1) / 2."""
  return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total) / total) + 1.0) / 2.0


def _fitted_momentum(before_key, before_query, after_key):
  """Least-squares m in `after = m * key + (1 - m) * query` over every leaf (float64),
  and the largest residual of that fit relative to the largest |key - query|."""
  k, q, a = (np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(t)])
             for t in (before_key, before_query, after_key))
  d = k - q
  m = float(np.dot(a - q, d) / np.dot(d, d))
  return m, float(np.abs(a - (m * k + (1 - m) * q)).max() / np.abs(d).max())


MOMENTUM_T, MOMENTUM_M0 = 4, 0.9


@pytest.fixture(scope="module")
def bituning_run():
  """One tiny Bi-tuning setup on 8 devices (ema_cosine=True, T = 4, m0 = 0.9) and a
  host copy of its initial state, shared by both momentum tests."""
  config = bituning_config.get_config("demo")
  config.init_from = ""
  config.image_size = 16
  config.batch_size = 16
  config.total_steps = MOMENTUM_T
  config.bituning.queue_size = 4
  config.bituning.ema_momentum = MOMENTUM_M0
  config.bituning.ema_cosine = True
  mesh = sharding.make_mesh()
  run = loop.setup(config, mesh)
  return config, mesh, run, jax.device_get(run.state)


@pytest.mark.parametrize("cosine", [True, False])
def test_key_encoder_momentum_in_real_bituning_steps(bituning_run, cosine):
  """`key_params` after the step from state t is `m_t * key + (1 - m_t) * params` of
  state t, with the BYOL ramp over T = 4 steps from m0 = 0.9 (m = 0.9, 0.915, 0.95,
  apart by 1e4 x the tolerance; the fit is good to ~1e-8) or constant m0 without
  `ema_cosine`."""
  config, mesh, run, initial = bituning_run
  train_step = run.train_step
  if not cosine:  # the same run with a constant momentum: only the step differs
    config = config.copy_and_resolve_references()
    config.bituning.ema_cosine = False
    train_step = jax.jit(base.make_train_step(bituning.METHOD, run.model,
                                              common.make_optimizer(config), config),
                         donate_argnums=0)
  state = jax.device_put(initial, run.state_shardings)
  fitted = []
  for t, batch in zip(range(3), fakes.view_batches(run)):
    key, query = jax.device_get((state.key_params, state.params))
    if t == 0:  # the key encoder starts as a copy of the query encoder
      for a, b in zip(jax.tree.leaves(key), jax.tree.leaves(query)):
        np.testing.assert_array_equal(a, b)
    state, _ = train_step(state, sharding.global_batch(batch, mesh))
    after = jax.device_get(state.key_params)
    if t == 0:
      for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(query)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
      continue
    m, residual = _fitted_momentum(key, query, after)
    want = (_momentum_ramp(t, base=MOMENTUM_M0, total=MOMENTUM_T) if cosine
            else MOMENTUM_M0)
    fitted.append((t, m, want))
    assert m == pytest.approx(want, abs=1e-6), (cosine, fitted)
    assert residual < 1e-4, (cosine, t, m, residual)  # ~3e-6 measured
  if cosine:  # the test can tell the ramp from a constant
    assert fitted[1][2] - fitted[0][2] > 1e4 * 1e-6


# --------------------------------------------------------------------------- queue size
@pytest.mark.parametrize("rate, queue_size", [
    (15, 8), (25, 8), (30, 16), (50, 16), (75, 24), (100, 32),  # SAMPLING_RATES
    (12.5, 8), (25.5, 16), (50.5, 24), (99.9, 32)])
def test_queue_size_by_sampling_rate(rate, queue_size):
  """The paper's K = 8, 16, 24, 32 at 25, 50, 75, 100%; in between, the next
  multiple of 8."""
  config = bituning_config.get_config(f"cub,resnet50,{rate}")
  assert config.sampling_rate == rate
  assert config.bituning.queue_size == queue_size, (rate, config.bituning.queue_size)
