"""Bi-tuning with memory-bank keys (`bituning.key_generation="memory_bank"`, Bi-tuning
Appendix B.2, Eqs. 7-8): the per-class draws, a real step on 8 devices against NumPy
float64 (the keys drawn, the losses, the banks' momentum update, the parameter update),
exact resume, and the same training on 1 device as on 8."""

import json

import jax
import numpy as np
import pytest

import processes
import test_method_steps as steps
from bitune_jax import queues, sharding
from bitune_jax.training import loop

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


def _config(case, **overrides):
  return steps._config("bituning", num_classes=case["classes"],  # pylint: disable=protected-access
                       shard_queues=case["shard_queues"],
                       bituning=dict({k: case.get(k, 1.0) for k in (
                           "temperature", "trade_off", "queue_size", "bank_momentum",
                           "ce_weight", "cce_weight", "ccl_weight")},
                           key_generation="memory_bank"), **overrides)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("case", BANK, ids=lambda c: f"seed{c['seed']}")
def test_memory_bank_step_matches_numpy(case, monkeypatch):
  config = _config(case)
  mesh, run = steps._setup(config, monkeypatch)  # pylint: disable=protected-access
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
  _, state, _, _ = steps._step(run, mesh, state, batches[0][1])  # pylint: disable=protected-access
  batch = batches[1][1]
  before, _, metrics, after = steps._step(run, mesh, state, batch)  # pylint: disable=protected-access
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

  out, stats = steps._forward(run.model, before.params, before.batch_stats,  # pylint: disable=protected-access
                              batch["image_q"])
  head = jax.tree.map(np.float64, before.params["head"]["dense"])
  ce, cce, ccl = steps._bituning_terms(  # pylint: disable=protected-access
      np, out=out, kernel=head["kernel"], bias=head["bias"], z_key=z_key,
      queue_h=queue_h, queue_z=queue_z, labels=labels, tau=tau)
  total = ce + trade_off * ((cce if use_cce else 0.0) + ccl)
  for name, value in (("ce", ce), ("cce", cce), ("ccl", ccl), ("loss", total)):
    if value is not None:
      np.testing.assert_allclose(metrics[name], value, rtol=steps.RTOL, err_msg=name)
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
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bitune_jax.methods import common  # pylint: disable=g-import-not-at-top

  def loss_fn(params, images):
    o, _ = common.forward(run.model, params, before.batch_stats, images, train=True)
    dense = params["head"]["dense"]
    t = steps._bituning_terms(  # pylint: disable=protected-access
        jnp, out=o, kernel=dense["kernel"], bias=dense["bias"], z_key=jnp.float32(z_key),
        queue_h=None if queue_h is None else jnp.float32(queue_h),
        queue_z=jnp.float32(queue_z), labels=labels, tau=tau)
    return t[0] + trade_off * ((t[1] if use_cce else 0.0) + t[2])
  images = sharding.global_batch({"x": batch["image_q"]}, mesh)["x"]
  grads = jax.device_get(jax.jit(jax.grad(loss_fn))(before.params, images))
  steps._check_update(config, before, after, grads, f"seed {case['seed']}")  # pylint: disable=protected-access


@pytest.mark.slow
def test_memory_bank_resumes_exactly_and_trains_alike_on_1_device(tmp_path):
  """6 steps straight; stopped after 4 (checkpoint at 3), then resumed to 6: the same
  final state, bit for bit.
  2 steps in a process of 1 device and on 8: the same banks and parameters, up to the
  order of float32 sums (the bank there has no padding rows). (Over 6 steps BatchNorm's
  gradients amplify that order to 0.5% of some biases.)"""
  case = dict(BANK[0], shard_queues=True)
  straight = tmp_path / "straight"
  final, _ = loop.train_and_evaluate(_config(case), str(straight))
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
      loop.train_and_evaluate(_config(case), str(resumed))  # checkpoint at step 3
  again, _ = loop.train_and_evaluate(_config(case), str(resumed))
  again = jax.device_get(again)
  launches = sorted((resumed / "launches").iterdir())
  assert json.loads(launches[-1].read_text())["start_step"] == 3
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(final)):
    np.testing.assert_array_equal(a, b)
  # One device: a real process, 2 steps of the same config, against 2 steps on 8.
  two = jax.device_get(loop.train_and_evaluate(
      _config(case, total_steps=2, checkpoint_every=2), str(tmp_path / "eight"))[0])
  config = _config(case)
  args = ["--config", "configs/bituning.py:demo", "--workdir", str(tmp_path / "one")] + [
      f"--config.{k}={v}" for k, v in (
          ("init_from", ""), ("image_size", 16), ("batch_size", 16),
          ("eval_batch_size", 64), ("total_steps", 2), ("log_every", 3),
          ("eval_every", 3), ("checkpoint_every", 2), ("num_classes", 5))] + [
      f"--config.bituning.{k}={config.bituning[k]}" for k in (
          "temperature", "trade_off", "queue_size", "bank_momentum", "key_generation")]
  proc = processes.launch(args, str(tmp_path / "logs"), devices=1)
  assert proc.wait() == [0], proc.log()[-3000:]
  one = processes.final_state(str(tmp_path / "one"), 2)
  n = int(two.extras["bank_counts"].sum())
  assert two.extras["bank_z"].keys.shape[0] == 8 * -(-n // 8)
  assert one["extras"]["bank_z"]["keys"].shape[0] == n  # no padding on one device
  for name in ("bank_z", "bank_h"):  # measured: 2e-7
    np.testing.assert_allclose(one["extras"][name]["keys"], two.extras[name].keys[:n],
                               rtol=0, atol=2e-6, err_msg=name)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one["params"]),
                          jax.tree.leaves(two.params)):  # measured: 2e-6 of the largest
    # + 2e-6 absolute: leaves still near zero after 2 steps (BatchNorm biases, 7e-4 at most)
    # carry the sums' order as an absolute error (5.7e-7 measured, seed 1154512437).
    assert np.max(np.abs(a - b)) <= 2e-5 * np.max(np.abs(b)) + 2e-6, jax.tree_util.keystr(path)
