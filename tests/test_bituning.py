"""Bi-tuning (`bitune_jax/methods/bituning.py`), on 8 simulated devices.

* The train step against NumPy float64 written from DESIGN.md: a real step from a
  perturbed state (key encoder != query encoder, random queue pointers), checked for
  the EMA of the key encoder, the keys each queue receives and where, the pointers,
  every loss term and the total recomputed from the forward outputs, and the parameter
  update (the gradient really holds CCE and CCL, not CE alone). Nothing here calls
  `bitune_jax.losses` or `bitune_jax.queues` for it; the harness and the shared
  references are in `method_references.py`.
* The loss ablations (Bi-tuning Table 5, `bituning.{ce,cce,ccl}_weight`): each
  combination trains on the embedded digits; a term of weight 0 is not computed and
  what only it needs is not built: its queue, for the CCL the projector, for both
  contrastive terms the key encoder. The step program's flops show it: CE alone costs
  what vanilla fine-tuning costs, and each term adds its share.
* Memory-bank keys (`bituning.key_generation="memory_bank"`, Bi-tuning Appendix B.2,
  Eqs. 7-8): the per-class draws, a real step against NumPy float64 (the keys drawn,
  the losses, the banks' momentum update, the parameter update), exact resume, and the
  same training on 1 device as on 8.
* The key-encoder momentum in real steps: the BYOL cosine ramp, or a constant.
* README features, each by a number a broken feature would change, on a Bi-tuning run
  from a converted checkpoint (resnet_small, 16 x 16 digits, batch 16): `init_from`
  into the query and the key encoder, replicated and padded (sharded) class queues,
  bf16 activations with a float32 state.
"""

import dataclasses
import json
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

import fakes
import method_references
from method_references import ckpt  # noqa: F401  pylint: disable=unused-import
import processes
from bitune_jax import queues, sharding
from bitune_jax.methods import base, bituning, common, optimizer
from bitune_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import bituning as bituning_config  # noqa: E402  pylint: disable=g-import-not-at-top

RTOL = method_references.RTOL
SEED, CLASSES, K = method_references.SEED, method_references.CLASSES, method_references.K
PADDED = 8  # queue rows of CLASSES classes on 8 devices


# --------------------------------------------------------------------------- references
def _class_kl(xp, *, own, slots, labels):
  """DESIGN.md's CCE/CCL: candidates = own then every slot (class-major), `own [B]`,
  `slots [B, C, K]` (already / tau); target uniform 1/(K+1) over own and the K slots of
  the query's class; KL(target || softmax), batch mean."""
  batch, classes, size = slots.shape
  logits = xp.concatenate([own[:, None], slots.reshape(batch, classes * size)], axis=1)
  target = np.zeros((batch, 1 + classes * size))
  target[:, 0] = 1.0 / (size + 1)
  for b, c in enumerate(labels):
    target[b, 1 + c * size:1 + (c + 1) * size] = 1.0 / (size + 1)
  cross = -xp.sum(target * method_references.log_softmax(xp, logits), axis=1)  # [B]
  return xp.mean(cross - np.log(size + 1))  # minus the target's entropy


def _bituning_terms(xp, *, out, kernel, bias, z_key, queue_h, queue_z, labels, tau):
  """`(ce, cce, ccl)` from the query's outputs; `queue_h [C, K, F+1]` and
  `queue_z [C, K, D]` hold the real classes only."""
  batch = labels.shape[0]
  stop = jax.lax.stop_gradient if xp is jnp else (lambda x: x)
  log_softmax, normalize = method_references.log_softmax, method_references.normalize
  ce = -xp.mean(log_softmax(xp, out["logits"])[np.arange(batch), labels])
  w_hat = stop(normalize(xp, xp.concatenate([kernel[:, labels].T, bias[labels][:, None]],
                                            axis=1)))  # [B, F+1]
  h_hat = normalize(xp, xp.concatenate([out["features"], xp.ones((batch, 1))], axis=1))
  cce = ccl = None  # None: a term without its queue
  if queue_h is not None:
    cce = _class_kl(xp, own=xp.sum(h_hat * w_hat, axis=1) / tau,
                    slots=xp.einsum("bx,ckx->bck", w_hat, queue_h) / tau, labels=labels)
  if queue_z is not None:
    z_q = normalize(xp, out["projection"])
    ccl = _class_kl(xp, own=xp.sum(z_q * z_key, axis=1) / tau,
                    slots=xp.einsum("bd,ckd->bck", z_q, queue_z) / tau, labels=labels)
  return ce, cce, ccl


def _enqueue_one_at_a_time(keys, ptr, new, labels):
  """Per-class queues `[C, K, D]`, one key at a time in batch order."""
  keys, ptr = np.array(keys, np.float64), np.array(ptr)
  for key, c in zip(new, labels):
    keys[c, ptr[c]] = key
    ptr[c] = (ptr[c] + 1) % keys.shape[1]
  return keys, ptr


# --------------------------------------------------------------------------- step
# Every temperature, trade-off, queue order and queue layout appears; and loss weights
# (Table 5's ablations): a zero-weight term and what only it needs (its queue; for the
# CCL, the projector) are absent. (Three cases, each its own step program: 15 to 27 CPU
# s apiece on this project's 2-core machine.)
BITUNING = [
    dict(seed=0, classes=5, shard_queues=True, temperature=0.07, trade_off=1.0,
         cce_after_enqueue=True, queue_size=4, ema_momentum=0.999),  # 5 in 8 rows
    dict(seed=1, classes=7, shard_queues=False, temperature=0.2, trade_off=0.3,
         cce_after_enqueue=False, queue_size=3, ema_momentum=0.99, ce_weight=0.0,
         cce_weight=1.5, ccl_weight=0.0),  # 7 rows; CCE alone
    dict(seed=2, classes=3, shard_queues=True, temperature=0.5, trade_off=0.7,
         cce_after_enqueue=True, queue_size=5, ema_momentum=0.999, ce_weight=0.5,
         cce_weight=0.0, ccl_weight=2.0),  # 3 in 8 rows; CE and CCL
]
WEIGHTS = ("ce_weight", "cce_weight", "ccl_weight")


def _bituning_run(case, monkeypatch):
  config = fakes.tiny_config("bituning", num_classes=case["classes"],
                             shard_queues=case["shard_queues"],
                             bituning={k: case.get(k, 1.0) for k in (
                                 "temperature", "trade_off", "cce_after_enqueue",
                                 "queue_size", "ema_momentum") + WEIGHTS})
  mesh, run = method_references.setup(config, monkeypatch)
  rng = np.random.default_rng(case["seed"])
  state = method_references.perturbed(run, rng)
  batches = []
  for _, batch in zip(range(2), run.data.train_batches(0)):
    if case["classes"] != 5:  # labels of our own for another class count
      batch["label"] = rng.integers(0, case["classes"], 16).astype(np.int32)
    batches.append(batch)
  first, state, _, _ = method_references.one_step(run, mesh, state, batches[0])
  before, _, metrics, after = method_references.one_step(run, mesh, state, batches[1])
  return config, run, (first, batches[0]), batches[1], before, after, metrics


def _check_enqueue(before, after, keys, labels, *, classes, size, msg):
  """`keys` (a dict of `[B, X]` per queue) went one at a time into their class's
  queue; the pointers moved by the counts; padding rows untouched. Returns the
  expected real rows of each queue."""
  expected = {}
  for name, new in keys.items():
    old, got = before.extras[name], after.extras[name]
    rows, ptr = _enqueue_one_at_a_time(old.keys[:classes], old.ptr[:classes], new, labels)
    expected[name] = rows
    np.testing.assert_allclose(got.keys[:classes], rows, rtol=1e-4, atol=1e-5,
                               err_msg=f"{msg} {name} keys")
    np.testing.assert_array_equal(got.ptr[:classes], ptr, err_msg=f"{msg} {name} ptr")
    np.testing.assert_array_equal(
        got.ptr[:classes], (old.ptr[:classes] + np.bincount(labels, minlength=classes))
        % size, err_msg=f"{msg} {name} ptr")
    np.testing.assert_array_equal(got.keys[classes:], old.keys[classes:], err_msg=msg)
    np.testing.assert_array_equal(got.ptr[classes:], old.ptr[classes:], err_msg=msg)
  return expected


@pytest.mark.parametrize("case", BITUNING, ids=lambda c: f"seed{c['seed']}")
def test_bituning_step_matches_numpy(case, monkeypatch):
  config, run, (first, first_batch), batch, before, after, metrics = _bituning_run(
      case, monkeypatch)
  seed, classes, size = case["seed"], case["classes"], case["queue_size"]
  tau, trade_off, labels = case["temperature"], case["trade_off"], batch["label"]
  w_ce, w_cce, w_ccl = (case.get(k, 1.0) for k in WEIGHTS)
  msg = f"seed {seed}"
  used = {"queue_h": w_cce > 0, "queue_z": w_ccl > 0}
  queue_names = [name for name, on in used.items() if on]
  assert sorted(before.extras) == queue_names, msg  # only the queues in use
  assert ("projector" in before.params) == (w_ccl > 0), msg
  assert sorted(metrics) == sorted(
      ["loss", "train_accuracy"] + [t for t, w in zip(("ce", "cce", "ccl"),
                                                      (w_ce, w_cce, w_ccl)) if w > 0]), msg
  for name in queue_names:
    assert before.extras[name].keys.shape[0] == (
        8 if case["shard_queues"] else classes), msg
  # Step 1 moved each class's pointer by its count in the first batch, mod K.
  first_counts = np.bincount(first_batch["label"], minlength=classes)
  for name in queue_names:
    np.testing.assert_array_equal(
        before.extras[name].ptr[:classes],
        (first.extras[name].ptr[:classes] + first_counts) % size, err_msg=f"{msg} {name}")

  # EMA of every query param, before the keys are computed.
  key_params = method_references.expected_ema(before, case["ema_momentum"])
  method_references.assert_tree_close(after.key_params, key_params, rtol=1e-6, atol=1e-7,
                                      what=f"{msg} key_params")
  key_out, key_stats = method_references.forward(run.model, key_params,
                                                 before.key_batch_stats, batch["image_k"])
  method_references.assert_tree_close(after.key_batch_stats, key_stats, rtol=1e-4,
                                      atol=1e-5, what=f"{msg} key_batch_stats")
  normalize = method_references.normalize
  keys = {}
  if used["queue_h"]:
    keys["queue_h"] = normalize(np, np.concatenate([key_out["features"],
                                                    np.ones((16, 1))], 1))
  if used["queue_z"]:
    keys["queue_z"] = z_k = normalize(np, key_out["projection"])
  else:
    z_k = None
  enqueued = _check_enqueue(before, after, keys, labels, classes=classes, size=size,
                            msg=msg)

  # The loss terms from the query's outputs: CCL against the queue before this batch,
  # CCE before or after this batch's keys were enqueued.
  out, stats = method_references.forward(run.model, before.params, before.batch_stats,
                                         batch["image_q"])
  method_references.assert_tree_close(after.batch_stats, stats, rtol=1e-4, atol=1e-5,
                                      what=f"{msg} batch_stats")
  queue_h = queue_z = None
  if used["queue_h"]:
    queue_h = np.float64(enqueued["queue_h"] if case["cce_after_enqueue"]
                         else before.extras["queue_h"].keys[:classes])
  if used["queue_z"]:
    queue_z = np.float64(before.extras["queue_z"].keys[:classes])
  head = jax.tree.map(np.float64, before.params["head"]["dense"])
  ce, cce, ccl = _bituning_terms(np, out=out, kernel=head["kernel"], bias=head["bias"],
                                 z_key=z_k, queue_h=queue_h, queue_z=queue_z,
                                 labels=labels, tau=tau)

  def total(ce, cce, ccl):
    return (w_ce * ce + trade_off * ((w_cce * cce if cce is not None else 0)
                                     + (w_ccl * ccl if ccl is not None else 0)))
  for name, value in (("ce", ce), ("cce", cce), ("ccl", ccl),
                      ("loss", total(ce, cce, ccl))):
    if name in metrics:
      np.testing.assert_allclose(metrics[name], value, rtol=RTOL, err_msg=f"{msg} {name}")

  # The update: the gradient of an independent jnp transliteration of the total.
  def loss_fn(params, images):
    out, _ = common.forward(run.model, params, before.batch_stats, images, train=True)
    dense = params["head"]["dense"]
    as_jnp = lambda x: None if x is None else jnp.float32(x)  # noqa: E731
    return total(*_bituning_terms(
        jnp, out=out, kernel=dense["kernel"], bias=dense["bias"], z_key=as_jnp(z_k),
        queue_h=as_jnp(queue_h), queue_z=as_jnp(queue_z), labels=labels, tau=tau))
  # The images sharded as the step's are: float32 sums in the same order. (BatchNorm
  # gradients cancel heavily in the stem: on one device they differ by up to ~2% of
  # the update there.)
  images = sharding.global_batch({"x": batch["image_q"]}, sharding.make_mesh())["x"]
  grads = jax.device_get(jax.jit(jax.grad(loss_fn))(before.params, images))
  method_references.check_update(config, before, after, grads, msg)


# --------------------------------------------------------------------------- Table 5
TABLE_5 = {  # name: (ce, cce, ccl) weights
    "CE": (1.0, 0.0, 0.0), "CE+CCE": (1.0, 1.0, 0.0), "CE+CCL": (1.0, 0.0, 1.0),
    "CCE+CCL": (0.0, 1.0, 1.0), "CE+CCE+CCL": (1.0, 1.0, 1.0)}


def _ablation_run(method, weights=None):
  config = fakes.tiny_config(method)
  if weights is not None:
    config.bituning.update(dict(zip(("ce_weight", "cce_weight", "ccl_weight"), weights)))
    # K slots, as `bituning_run` has: the full combination's step is that run's program
    # (the state's values differ, not the program), compiled once for the file.
    config.bituning.queue_size = K
  mesh = sharding.make_mesh()
  run = loop.setup(config, mesh)
  batch = sharding.global_batch(next(run.data.train_batches(0)), mesh)
  # XLA's cost analysis of the program the step hands the compiler (what was traced: a
  # term of weight 0 is not in it at all); the test below compiles and steps that
  # program, and vanilla fine-tuning's, measured only, is never compiled.
  cost = run.train_step.lower(run.state, batch).cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return run, mesh, float(cost["flops"])


@pytest.fixture(scope="module")
def table_5_runs():
  """`_ablation_run` of each combination of Table 5, and of vanilla fine-tuning."""
  out = {name: _ablation_run("bituning", w) for name, w in TABLE_5.items()}
  out["finetune"] = _ablation_run("finetune")
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TABLE_5))
def test_each_combination_of_table_5_trains_without_what_it_does_not_use(table_5_runs,
                                                                          name):
  run, mesh, _ = table_5_runs[name]
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
def test_a_zero_weight_term_costs_nothing_in_the_step(table_5_runs):
  flops = {name: f for name, (_, _, f) in table_5_runs.items()}
  # CE alone is vanilla fine-tuning: the same work (within 1%: the views' key
  # derivations may differ; measured: equal).
  assert flops["CE"] == pytest.approx(flops["finetune"], rel=0.01), flops
  # Each contrastive term adds the key encoder's forward (the first) and its own loss.
  for smaller, larger in (("CE", "CE+CCE"), ("CE", "CE+CCL"), ("CE+CCE", "CE+CCE+CCL"),
                          ("CE+CCL", "CE+CCE+CCL"), ("CCE+CCL", "CE+CCE+CCL")):
    assert flops[smaller] < flops[larger], (smaller, larger, flops)
  # The key encoder's forward dominates what a contrastive term adds (a forward is
  # about a third of a forward and backward; measured 34%), while the second term adds
  # far less (0.3%).
  assert flops["CE+CCE"] - flops["CE"] > 0.2 * flops["CE"], flops
  assert flops["CE+CCE+CCL"] - flops["CE+CCE"] < 0.3 * flops["CE"], flops


# --------------------------------------------------------------------------- memory bank
MOMENTUM_RTOL = 1e-4


def test_class_index_table_lists_each_class_rows():
  labels = np.array([2, 0, 2, -1, 1, 2, 0])
  table, counts = queues.class_index_table(labels, num_rows=4)
  np.testing.assert_array_equal(counts, [2, 1, 3, 0])
  for c in range(4):
    np.testing.assert_array_equal(table[c, :counts[c]], np.flatnonzero(labels == c))
  with pytest.raises(ValueError, match="labels must be"):
    queues.class_index_table(np.array([0, 4]), num_rows=4)


def test_sample_class_keys_draws_uniformly_within_each_class(rng):
  """Keys that name their own row (one-hot): each class draws only its own examples,
  each about equally often (within 5 standard errors), and K per class."""
  labels = rng.integers(0, 3, 40)
  labels[:3] = (0, 1, 2)  # every class present
  table, counts = queues.class_index_table(labels, num_rows=4)  # class 3: padding
  keys = np.eye(40, dtype=np.float32)
  draw = jax.jit(lambda r: queues.sample_class_keys(keys, table=table, counts=counts,
                                                    rng=r, size=5))
  hits = np.zeros((4, 40))
  draws = 400
  for i in range(draws):
    out = np.asarray(draw(jax.random.PRNGKey(i)))  # [4, 5, 40]
    assert out.shape == (4, 5, 40)
    hits += out.sum(axis=1)
  for c in range(3):
    own = labels == c
    assert hits[c, ~own].sum() == 0, c
    expected = draws * 5 / own.sum()
    spread = np.sqrt(expected * (1 - 1 / own.sum()))
    assert np.all(np.abs(hits[c, own] - expected) < 5 * spread), (c, hits[c, own])
  assert hits[3, 0] == draws * 5  # the padding class: row 0, never used


BANK = [dict(seed=11, classes=5, shard_queues=True, temperature=0.07, trade_off=1.0,
             queue_size=3, bank_momentum=0.5),
        dict(seed=12, classes=5, shard_queues=False, temperature=0.2, trade_off=0.4,
             queue_size=4, bank_momentum=0.3, cce_weight=0.0)]


def _bank_config(case, **overrides):
  return fakes.tiny_config("bituning", num_classes=case["classes"],
                           shard_queues=case["shard_queues"],
                           bituning=dict({k: case.get(k, 1.0) for k in (
                               "temperature", "trade_off", "queue_size", "bank_momentum",
                               "ce_weight", "cce_weight", "ccl_weight")},
                               key_generation="memory_bank"), **overrides)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("case", BANK, ids=lambda c: f"seed{c['seed']}")
def test_memory_bank_step_matches_numpy(case, monkeypatch):
  config = _bank_config(case)
  mesh, run = method_references.setup(config, monkeypatch)
  classes, size, m = case["classes"], case["queue_size"], case["bank_momentum"]
  tau, trade_off = case["temperature"], case["trade_off"]
  use_cce = case.get("cce_weight", 1.0) > 0
  state = run.state
  labels_all = np.asarray(run.data.pool.labels)
  n = len(labels_all)
  first = jax.device_get(state)
  # No key encoder, no queue; one bank row per training example (+ padding rows).
  assert first.key_params == {} and first.key_batch_stats == {}
  assert sorted(first.extras) == sorted(
      ["bank_table", "bank_counts", "bank_z"] + (["bank_h"] if use_cce else []))
  rows = first.extras["bank_z"].keys.shape[0]
  assert rows == (-(-n // 8) * 8 if case["shard_queues"] else n)
  np.testing.assert_array_equal(first.extras["bank_counts"][:classes],
                                np.bincount(labels_all, minlength=classes))
  batches = list(zip(range(2), run.data.train_batches(0)))
  _, state, _, _ = method_references.one_step(run, mesh, state, batches[0][1])
  batch = batches[1][1]
  before, _, metrics, after = method_references.one_step(run, mesh, state, batch)
  labels, index = batch["label"], batch["index"]
  np.testing.assert_array_equal(labels, labels_all[index])  # the index is the pool row

  # The keys each term read: K rows per class, drawn as the rule says (uniform over
  # the class's examples: floor(u * count)), from the banks before this batch.
  table = before.extras["bank_table"]
  counts = before.extras["bank_counts"]
  rng_h, rng_z = jax.random.split(jax.random.fold_in(before.rng, before.step))

  def drawn(rng, bank):
    u = np.stack([np.asarray(jax.random.uniform(jax.random.fold_in(rng, c), (size,)),
                             np.float64) for c in range(len(table))])
    pick = np.minimum(np.floor(u * counts[:, None]).astype(int), counts[:, None] - 1)
    chosen = np.take_along_axis(table, np.maximum(pick, 0), axis=1)[:classes]  # [C, K]
    assert np.all(labels_all[chosen] == np.arange(classes)[:, None])
    return np.float64(bank[chosen])
  queue_h = drawn(rng_h, before.extras["bank_h"].keys) if use_cce else None
  queue_z = drawn(rng_z, before.extras["bank_z"].keys)
  z_key = np.float64(before.extras["bank_z"].keys[index])  # own snapshots

  out, stats = method_references.forward(run.model, before.params, before.batch_stats,
                                         batch["image_q"])
  head = jax.tree.map(np.float64, before.params["head"]["dense"])
  ce, cce, ccl = _bituning_terms(
      np, out=out, kernel=head["kernel"], bias=head["bias"], z_key=z_key,
      queue_h=queue_h, queue_z=queue_z, labels=labels, tau=tau)
  total = ce + trade_off * ((cce if use_cce else 0.0) + ccl)
  for name, value in (("ce", ce), ("cce", cce), ("ccl", ccl), ("loss", total)):
    if value is not None:
      np.testing.assert_allclose(metrics[name], value, rtol=RTOL, err_msg=name)
  assert ("cce" in metrics) == use_cce

  # Eqs. (7)-(8): the batch's rows move to normalize(m old + (1 - m) new); no other.
  new = {"bank_z": _unit(out["projection"])}
  if use_cce:
    new["bank_h"] = _unit(np.concatenate([out["features"], np.ones((16, 1))], 1))
  for name, values in new.items():
    old, got = np.float64(before.extras[name].keys), after.extras[name].keys
    expected = old.copy()
    expected[index] = _unit(m * old[index] + (1 - m) * values)
    np.testing.assert_allclose(got, expected, rtol=MOMENTUM_RTOL, atol=1e-6,
                               err_msg=name)
    others = np.setdiff1d(np.arange(rows), index)
    np.testing.assert_array_equal(got[others], before.extras[name].keys[others])

  # The update: the gradient of an independent jnp transliteration of the loss.
  def loss_fn(params, images):
    o, _ = common.forward(run.model, params, before.batch_stats, images, train=True)
    dense = params["head"]["dense"]
    t = _bituning_terms(
        jnp, out=o, kernel=dense["kernel"], bias=dense["bias"], z_key=jnp.float32(z_key),
        queue_h=None if queue_h is None else jnp.float32(queue_h),
        queue_z=jnp.float32(queue_z), labels=labels, tau=tau)
    return t[0] + trade_off * ((t[1] if use_cce else 0.0) + t[2])
  images = sharding.global_batch({"x": batch["image_q"]}, mesh)["x"]
  grads = jax.device_get(jax.jit(jax.grad(loss_fn))(before.params, images))
  method_references.check_update(config, before, after, grads, f"seed {case['seed']}")


@pytest.mark.slow
def test_memory_bank_resumes_exactly_and_trains_alike_on_1_device(tmp_path):
  """6 steps straight; stopped after 4 (checkpoint at 3), then resumed to 6: the same
  final state, bit for bit.
  The same run in a process of 1 device: at its step-3 checkpoint the same banks and
  parameters as the 8-device run's, up to the order of float32 sums (the bank there has
  no padding rows). (Over 6 steps BatchNorm's gradients amplify that order to 0.5% of
  some biases.)"""
  case = dict(BANK[0], shard_queues=True)
  straight = tmp_path / "straight"
  final, _ = loop.train_and_evaluate(_bank_config(case), str(straight))
  final = jax.device_get(final)
  resumed = tmp_path / "resumed"
  real_batches = loop.train_batches  # pylint: disable=protected-access

  def stop_after_4(run, mesh, start_step):
    for step, batch in enumerate(real_batches(run, mesh, start_step), start_step):
      if step == 4:
        raise KeyboardInterrupt("stopped before step 5")
      yield batch
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop, "train_batches", stop_after_4)
    with pytest.raises(KeyboardInterrupt):
      loop.train_and_evaluate(_bank_config(case), str(resumed))  # checkpoint at step 3
  again, _ = loop.train_and_evaluate(_bank_config(case), str(resumed))
  again = jax.device_get(again)
  launches = sorted((resumed / "launches").iterdir())
  assert json.loads(launches[-1].read_text())["start_step"] == 3
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(final)):
    np.testing.assert_array_equal(a, b)
  # One device: a real process, the same config, against the 8-device run at step 3
  # (its checkpoint; the 1-device steps after it cost next to nothing).
  config = _bank_config(case)
  args = ["--config", "configs/bituning.py:demo", "--workdir", str(tmp_path / "one")] + [
      f"--config.{k}={v}" for k, v in (
          ("init_from", ""), ("image_size", 16), ("batch_size", 16),
          ("eval_batch_size", 64), ("total_steps", 6), ("log_every", 3),
          ("eval_every", 3), ("checkpoint_every", 3), ("num_classes", 5))] + [
      f"--config.bituning.{k}={config.bituning[k]}" for k in (
          "temperature", "trade_off", "queue_size", "bank_momentum", "key_generation")]
  proc = processes.launch(args, str(tmp_path / "logs"), devices=1)
  assert proc.wait() == [0], proc.log()[-3000:]
  one, eight = (processes.final_state(str(tmp_path / d), 3) for d in ("one", "straight"))
  n = int(eight["extras"]["bank_counts"].sum())
  assert eight["extras"]["bank_z"]["keys"].shape[0] == 8 * -(-n // 8)
  assert one["extras"]["bank_z"]["keys"].shape[0] == n  # no padding on one device
  for name in ("bank_z", "bank_h"):  # measured: 2.8e-7
    np.testing.assert_allclose(one["extras"][name]["keys"],
                               eight["extras"][name]["keys"][:n], rtol=0, atol=2e-6,
                               err_msg=name)
  # Measured: 3.7e-6 of the leaf's largest value.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one["params"]),
                          jax.tree.leaves(eight["params"])):
    # + 2e-6 absolute: leaves still near zero after a few steps (BatchNorm biases, 7e-4 at
    # most) carry the sums' order as an absolute error (5.7e-7 measured at step 2, seed
    # 1154512437).
    assert np.max(np.abs(a - b)) <= 2e-5 * np.max(np.abs(b)) + 2e-6, jax.tree_util.keystr(path)


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
def ema_cosine_run():
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
def test_key_encoder_momentum_in_real_bituning_steps(ema_cosine_run, cosine):
  """`key_params` after the step from state t is `m_t * key + (1 - m_t) * params` of
  state t, with the BYOL ramp over T = 4 steps from m0 = 0.9 (m = 0.9, 0.915, 0.95,
  apart by 1e4 x the tolerance; the fit is good to ~1e-8) or constant m0 without
  `ema_cosine`."""
  config, mesh, run, initial = ema_cosine_run
  train_step = run.train_step
  if not cosine:  # the same run with a constant momentum: only the step differs
    config = config.copy_and_resolve_references()
    config.bituning.ema_cosine = False
    train_step = jax.jit(base.make_train_step(bituning.METHOD, run.model,
                                              optimizer.make_optimizer(config), config),
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


# --------------------------------------------------------------------------- README runs
def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(jax.device_get(tree)).items()}


@dataclasses.dataclass
class Trajectory:
  """A Bi-tuning run stepped twice: host copies of the state before and after each
  step (`states[0..2]`), the metrics and local batches of each step."""
  config: Any
  mesh: Any
  run: Any
  states: list
  metrics: list
  batches: list
  shared_buffers: list  # leaves of key_params / key_batch_stats aliasing the query's


def _pairs(a, b):
  """`{path: (leaf of a, leaf of b)}` of two trees of the same structure."""
  flat_b = traverse_util.flatten_dict(b)
  return {"/".join(k): (v, flat_b[k]) for k, v in traverse_util.flatten_dict(a).items()}


def _aliased(a, b):
  """Paths where the two trees' device-0 buffers are the same memory."""
  pointer = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()  # noqa: E731
  return [k for k, (x, y) in _pairs(a, b).items() if pointer(x) == pointer(y)]


@pytest.fixture(scope="module")
def bituning_run(ckpt):
  """Bi-tuning from `ckpt`, 5 classes on 8 devices with sharded queues (the default)."""
  config = method_references.run_config(bituning_config, init_from=ckpt)
  mesh = sharding.make_mesh()
  run = loop.setup(config, mesh)
  state = run.state
  shared = (_aliased(state.params, state.key_params)
            + _aliased(state.batch_stats, state.key_batch_stats))
  states, metrics, local = [jax.device_get(state)], [], []
  for _, batch in zip(range(2), fakes.view_batches(run)):
    state, m = run.train_step(state, sharding.global_batch(batch, mesh))
    states.append(jax.device_get(state))
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    local.append(batch)
  return Trajectory(config, mesh, run, states, metrics, local, shared)


# --------------------------------------------------------------------------- init_from
def test_init_from_fills_query_and_key_encoders_then_ema(bituning_run, ckpt):
  with np.load(ckpt, allow_pickle=False) as f:
    file = {k: f[k] for k in f.files if k.startswith("backbone/")}
  s0, s1, s2 = bituning_run.states
  for name, tree in (("params", s0.params), ("key_params", s0.key_params)):
    got = _flat(tree["backbone"])
    assert len(got) == len([k for k in file if k.startswith("backbone/params/")]), name
    for k, v in got.items():
      np.testing.assert_array_equal(v, file[f"backbone/params/{k}"],
                                    err_msg=f"{name} {k}")
  for name, tree in (("batch_stats", s0.batch_stats),
                     ("key_batch_stats", s0.key_batch_stats)):
    got = _flat(tree["backbone"])
    assert len(got) == len([k for k in file if k.startswith("backbone/batch_stats/")])
    for k, v in got.items():
      np.testing.assert_array_equal(v, file[f"backbone/batch_stats/{k}"],
                                    err_msg=f"{name} {k}")
  assert bituning_run.shared_buffers == [], "key encoder aliases the query encoder"
  # The EMA rule, key <- m key + (1 - m) params (the params before the step), float64.
  m = bituning_run.config.bituning.ema_momentum
  moves, targets = [], []
  for k, (key1, param1) in _pairs(_flat(s1.key_params), _flat(s1.params)).items():
    key1, param1 = key1.astype(np.float64), param1.astype(np.float64)
    key2 = _flat(s2.key_params)[k].astype(np.float64)
    np.testing.assert_allclose(key2, m * key1 + (1 - m) * param1, rtol=0, atol=1e-6,
                               err_msg=f"seed {SEED}: EMA of {k}")
    moves.append((key2 - key1).ravel())
    targets.append((param1 - key1).ravel())
  # Most single moves are a few float32 ulps (2e-7 .. 3e-5): over all leaves at once,
  # the step size they imply is 1 - m to 0.1% (a frozen key encoder gives 0).
  moves, targets = np.concatenate(moves), np.concatenate(targets)
  implied = float(np.dot(moves, targets) / np.dot(targets, targets))
  assert implied == pytest.approx(1 - m, rel=1e-3), (SEED, implied)
  # One step from the file, the key encoder is still the file (m x + (1 - m) x) while
  # the query encoder has moved away from it.
  key1, param1 = _flat(s1.key_params["backbone"]), _flat(s1.params["backbone"])
  for k, v in key1.items():
    np.testing.assert_allclose(v, file[f"backbone/params/{k}"], rtol=0, atol=1e-6)
  moved = max(np.abs(v - file[f"backbone/params/{k}"]).max() for k, v in param1.items())
  assert moved > 1e-4, (SEED, moved)


# --------------------------------------------------------------------------- queues
def test_replicated_queues_give_the_sharded_losses(bituning_run, ckpt):
  config = method_references.run_config(bituning_config, init_from=ckpt,
                                        shard_queues=False)
  mesh = bituning_run.mesh
  run = loop.setup(config, mesh)
  sharded = bituning_run.states
  for name in ("queue_h", "queue_z"):
    q = run.state.extras[name]
    assert q.keys.shape[0] == CLASSES and q.ptr.shape == (CLASSES,)  # no padding rows
    assert q.keys.sharding.spec == P() and q.keys.sharding.is_fully_replicated, name
    assert q.keys.addressable_shards[0].data.shape == q.keys.shape
    # The real classes' queues do not depend on the padding: same initial rows.
    np.testing.assert_array_equal(np.asarray(q.keys),
                                  sharded[0].extras[name].keys[:CLASSES])
  state, metrics = run.train_step(run.state,
                                  sharding.global_batch(bituning_run.batches[0], mesh))
  metrics = jax.device_get(metrics)
  for key, want in bituning_run.metrics[0].items():
    assert float(metrics[key]) == pytest.approx(want, rel=1e-5, abs=1e-6), (SEED, key)
  for name in ("queue_h", "queue_z"):
    keys = state.extras[name].keys
    assert keys.sharding.spec == P() and keys.shape[0] == CLASSES
    np.testing.assert_allclose(np.asarray(keys), sharded[1].extras[name].keys[:CLASSES],
                               rtol=1e-5, atol=1e-6, err_msg=f"seed {SEED}: {name}")
    np.testing.assert_array_equal(np.asarray(state.extras[name].ptr),
                                  sharded[1].extras[name].ptr[:CLASSES])


def test_padding_rows_of_sharded_queues_never_change_nor_count(bituning_run):
  run, mesh = bituning_run.run, bituning_run.mesh
  s0, s1, s2 = bituning_run.states
  labels = [b["label"] for b in bituning_run.batches]
  for name in ("queue_h", "queue_z"):
    assert s0.extras[name].keys.shape[0] == PADDED
    np.testing.assert_array_equal(s0.extras[name].keys[CLASSES:], 0.0)  # jnp.pad's zeros
    for t, s in enumerate((s1, s2), 1):
      np.testing.assert_array_equal(s.extras[name].keys[CLASSES:], 0.0,
                                    err_msg=f"{name} padding rows after step {t}")
      counts = np.bincount(np.concatenate(labels[:t]), minlength=PADDED)
      np.testing.assert_array_equal(s.extras[name].ptr, counts % K, err_msg=name)
  # Junk in the padding rows: the same losses and params one step later, junk kept.
  rng = np.random.default_rng(SEED)
  junk = s1.replace(extras={
      name: q.replace(keys=q.keys.copy()) for name, q in s1.extras.items()})
  for q in junk.extras.values():
    q.keys[CLASSES:] = 50.0 * rng.standard_normal(q.keys[CLASSES:].shape)
  junk_rows = {name: q.keys[CLASSES:].copy() for name, q in junk.extras.items()}
  state, metrics = run.train_step(jax.device_put(junk, run.state_shardings),
                                  sharding.global_batch(bituning_run.batches[1], mesh))
  metrics, state = jax.device_get((metrics, state))
  for key, want in bituning_run.metrics[1].items():
    assert float(metrics[key]) == pytest.approx(want, rel=1e-6, abs=1e-7), (SEED, key)
  for k, (got, want) in _pairs(_flat(state.params), _flat(s2.params)).items():
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=k)
  for name, rows in junk_rows.items():
    np.testing.assert_array_equal(state.extras[name].keys[CLASSES:], rows, err_msg=name)


# --------------------------------------------------------------------------- bf16
def test_bf16_activations_float32_state(bituning_run, ckpt):
  config = method_references.run_config(bituning_config, init_from=ckpt, bf16=True)
  mesh = bituning_run.mesh
  run = loop.setup(config, mesh)
  batch = sharding.global_batch(bituning_run.batches[0], mesh)
  # The compiled step convolves in bfloat16: every convolution's operands are bf16.
  convs = [line for line in run.train_step.lower(run.state, batch).as_text().splitlines()
           if "stablehlo.convolution" in line]
  assert convs and all("xbf16>" in c and "xf32>" not in c for c in convs), convs[:2]
  state, metrics = run.train_step(run.state, batch)
  state, metrics = jax.device_get((state, metrics))
  for part in ("params", "batch_stats", "key_params", "key_batch_stats", "extras"):
    dtypes = {str(x.dtype) for x in jax.tree.leaves(getattr(state, part))
              if np.issubdtype(x.dtype, np.floating)}
    assert dtypes == {"float32"}, (part, dtypes)
  # bf16 keeps 8 bits of mantissa (rounding 2^-9 = 2e-3 relative per op); the losses
  # are float32 functions of those activations and moved by 6e-4 relative at most
  # (measured, seed 0). 2e-2 leaves 30x room and still fails a missing or doubled
  # term (CE, CCE, CCL are 13%, 21% and 66% of the loss here).
  f32 = bituning_run.metrics[0]
  for key in ("loss", "ce", "cce", "ccl"):
    got = float(metrics[key])
    assert np.isfinite(got) and got == pytest.approx(f32[key], rel=2e-2), (SEED, key, got)
  assert float(metrics["loss"]) != f32["loss"], "bf16 run gave the float32 loss exactly"
