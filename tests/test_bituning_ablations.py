"""Bi-tuning's loss ablations (Bi-tuning Table 5): `bituning.{ce,cce,ccl}_weight`.

Each combination of the table trains on the embedded digits; a term of weight 0 is
not computed and what only it needs is not built: its queue, for the CCL the
projector, for both contrastive terms the key encoder. The compiled step's flops show
it: CE alone costs what vanilla fine-tuning costs, and each term adds its share.
(The weighted loss itself is checked against NumPy in `test_method_steps.py`.)
"""

import jax
import numpy as np
import pytest

import fakes
from bitune_jax import sharding
from bitune_jax.training import loop

TABLE_5 = {  # name: (ce, cce, ccl) weights
    "CE": (1.0, 0.0, 0.0), "CE+CCE": (1.0, 1.0, 0.0), "CE+CCL": (1.0, 0.0, 1.0),
    "CCE+CCL": (0.0, 1.0, 1.0), "CE+CCE+CCL": (1.0, 1.0, 1.0)}


def _run(method, weights=None):
  config = fakes.tiny_config(method)
  if weights is not None:
    config.bituning.update(dict(zip(("ce_weight", "cce_weight", "ccl_weight"), weights)))
  mesh = sharding.make_mesh()
  run = loop.setup(config, mesh)
  batch = sharding.global_batch(next(run.data.train_batches(0)), mesh)
  cost = run.train_step.lower(run.state, batch).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return run, mesh, float(cost["flops"])


@pytest.fixture(scope="module")
def runs():
  out = {name: _run("bituning", w) for name, w in TABLE_5.items()}
  out["finetune"] = _run("finetune")
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TABLE_5))
def test_each_combination_of_table_5_trains_without_what_it_does_not_use(runs, name):
  run, mesh, _ = runs[name]
  ce, cce, ccl = TABLE_5[name]
  state = run.state
  assert sorted(state.extras) == [q for q, w in (("queue_h", cce), ("queue_z", ccl))
                                  if w > 0]
  assert ("projector" in state.params) == (ccl > 0)
  assert bool(state.key_params) == (cce > 0 or ccl > 0)
  before = jax.device_get(state.params)
  for step, batch in zip(range(3), run.data.train_batches(0)):
    state, metrics = run.train_step(state, sharding.global_batch(batch, mesh))
    metrics = jax.device_get(metrics)
    terms = [t for t, w in (("ce", ce), ("cce", cce), ("ccl", ccl)) if w > 0]
    assert sorted(metrics) == sorted(["loss", "train_accuracy"] + terms), step
    expected = sum(w * metrics[t] for t, w in (("ce", ce), ("cce", cce), ("ccl", ccl))
                   if w > 0)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6)
    assert all(np.isfinite(v) for v in metrics.values())
  run.state = state  # the run's state was donated: keep the live one
  after = jax.device_get(state.params)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), before, after)
  assert moved["head"]["dense"]["kernel"] > 0 and moved["backbone"]["conv1"]["kernel"] > 0


@pytest.mark.slow
def test_a_zero_weight_term_costs_nothing_in_the_compiled_step(runs):
  flops = {name: f for name, (_, _, f) in runs.items()}
  # CE alone is vanilla fine-tuning: the same compiled work (within 1%: the views'
  # key derivations differ).
  assert flops["CE"] == pytest.approx(flops["finetune"], rel=0.01), flops
  # Each contrastive term adds the key encoder's forward (the first) and its own loss.
  for smaller, larger in (("CE", "CE+CCE"), ("CE", "CE+CCL"), ("CE+CCE", "CE+CCE+CCL"),
                          ("CE+CCL", "CE+CCE+CCL"), ("CCE+CCL", "CE+CCE+CCL")):
    assert flops[smaller] < flops[larger], (smaller, larger, flops)
  # The key encoder's forward dominates what a contrastive term adds (a forward is
  # about a third of a forward and backward; measured 32%), while the second term adds
  # far less (1%).
  assert flops["CE+CCE"] - flops["CE"] > 0.2 * flops["CE"], flops
  assert flops["CE+CCE+CCL"] - flops["CE+CCE"] < 0.3 * flops["CE"], flops
