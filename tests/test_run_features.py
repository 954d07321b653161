"""README features under test, each by a number a broken feature would change: the
cosine schedule in the applied updates, replicated and padded (sharded) class queues,
bf16 activations, `init_from` into a method with a key encoder, and Co-Tuning's
held-out split and `calibrate` flag. Tiny runs: resnet_small, 16 x 16 digits, batch 16,
8 simulated devices."""

import dataclasses
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

from bitune_jax import convert, models, relationship, sharding
from bitune_jax.data import splits
from bitune_jax.methods import common
from bitune_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import bituning as bituning_config  # noqa: E402  pylint: disable=g-import-not-at-top
import fakes  # noqa: E402  pylint: disable=g-import-not-at-top
import outside  # noqa: E402  pylint: disable=g-import-not-at-top
import cotuning as cotuning_config  # noqa: E402  pylint: disable=g-import-not-at-top
import finetune as finetune_config  # noqa: E402  pylint: disable=g-import-not-at-top

SEED = 0  # config.seed of every run here
CKPT_SEED = 3  # the converted checkpoint's random backbone, statistics and source head
CLASSES, PADDED, K = 5, 8, 4  # digits 5-9; queue rows on 8 devices; slots per class


def _config(module, **overrides):
  config = fakes.tiny_config(module.get_config("demo").method, seed=SEED, **overrides)
  if config.method == "bituning" and "queue_size" not in overrides.get("bituning", {}):
    config.bituning.queue_size = K
  return config


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A bitune-convert style file: a random resnet_small backbone, BatchNorm statistics
  drawn at random (not the init's 0 and 1, so that they identify the file) and a
  5-class source head."""
  rng = np.random.default_rng(CKPT_SEED)
  variables = jax.device_get(dict(models.create_backbone("resnet_small").init(
      jax.random.PRNGKey(CKPT_SEED), jnp.zeros((1, 16, 16, 3)))))
  draw = {"mean": lambda shape: rng.normal(0.0, 0.1, shape),
          "var": lambda shape: rng.uniform(0.5, 1.5, shape)}
  variables["batch_stats"] = jax.tree_util.tree_map_with_path(
      lambda path, x: draw[path[-1].key](x.shape).astype(np.float32),
      variables["batch_stats"])
  head = {"kernel": rng.standard_normal((64, CLASSES)),
          "bias": rng.standard_normal(CLASSES)}
  result = {"backbone": variables,
            "source_head": jax.tree.map(lambda x: x.astype(np.float32), head),
            "report": {"format": "test", "arch": "resnet_small", "kind": "supervised",
                       "notes": [], "dropped": []}}
  path = str(tmp_path_factory.mktemp("ckpt") / "backbone.npz")
  convert.save_converted(result, path)
  return path


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
  config, mesh = _config(bituning_config, init_from=ckpt), sharding.make_mesh()
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
  config = _config(bituning_config, init_from=ckpt, shard_queues=False)
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
  config = _config(bituning_config, init_from=ckpt, bf16=True)
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


# --------------------------------------------------------------------------- schedule
def test_cosine_schedule_is_the_learning_rate_applied():
  """The head bias's SGD updates (weight decay, nesterov momentum) recomputed in
  float64 from the step's logits: the learning rate they imply is the cosine's."""
  config = _config(finetune_config, schedule="cosine")
  mesh = sharding.make_mesh()
  run = loop.setup(config, mesh)
  state, trace = run.state, np.zeros(CLASSES)
  mu, wd, lr, total = config.momentum, config.weight_decay, config.lr, config.total_steps
  step_lr = [config.lr * (config.decay_factor if t >= int(0.7 * total) else 1.0)
             for t in range(total)]
  for t, batch in zip(range(4), fakes.view_batches(run)):
    before = jax.device_get(state)
    state, _ = run.train_step(state, sharding.global_batch(batch, mesh))
    after = np.asarray(state.params["head"]["dense"]["bias"], np.float64)
    out, _ = common.forward(run.model, before.params, before.batch_stats, batch["image"],
                            train=True)
    logits = np.asarray(out["logits"], np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    bias = np.asarray(before.params["head"]["dense"]["bias"], np.float64)
    grad = (probs - np.eye(CLASSES)[batch["label"]]).mean(0) + wd * bias
    trace = grad + mu * trace
    update = grad + mu * trace  # nesterov
    implied = float(np.dot(bias - after, update) / np.dot(update, update))
    cosine = lr * 0.5 * (1 + math.cos(math.pi * t / total))
    # Measured: implied within 2e-7 relative, bias within 3e-9 (float32 noise of the
    # logits); the step schedule's 0.05 vs the cosine's 0.0467 at t = 1 is 7%.
    assert implied == pytest.approx(cosine, rel=1e-4), (SEED, t, implied, cosine,
                                                        step_lr[t])
    np.testing.assert_allclose(after, bias - cosine * update, rtol=0, atol=1e-7)
  assert step_lr[1] != pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / total)), rel=1e-2)


# --------------------------------------------------------------------------- Co-Tuning
def _holdout(labels, fraction, seed):
  """The stratified held-out split, written out: per class (sorted), a permutation
  from one generator, the first floor(fraction * n) (at most n - 1) held out."""
  rng = np.random.default_rng(seed)
  val = []
  for c in sorted(set(labels.tolist())):
    members = rng.permutation(np.flatnonzero(labels == c))
    val += members[:min(int(fraction * len(members)), len(members) - 1)].tolist()
  val = np.sort(np.asarray(val, np.int64))
  return np.setdiff1d(np.arange(len(labels)), val), val


def test_cotuning_reverse_relationship_holdout_and_calibrate(tmp_path, ckpt):
  mesh = sharding.make_mesh()
  matrices = {}
  for calibrate in (False, True):
    config = _config(cotuning_config, init_from=ckpt,
                     cotuning=dict(relationship="reverse", calibrate=calibrate))
    run = loop.setup(config, mesh, workdir=str(tmp_path / f"calibrate_{calibrate}"))
    matrices[calibrate] = np.asarray(run.state.extras["relationship"])
  fraction = config.cotuning.holdout_fraction
  labels = run.data.train.labels
  fit, val = _holdout(labels, fraction, SEED)
  lib_fit, lib_val = splits.holdout_split(labels, fraction=fraction, seed=SEED)
  np.testing.assert_array_equal(lib_fit, fit)
  np.testing.assert_array_equal(lib_val, val)
  n = np.bincount(labels, minlength=CLASSES)
  np.testing.assert_array_equal(np.bincount(labels[val], minlength=CLASSES),
                                np.floor(fraction * n).astype(int), err_msg=str(n))
  # The source model's eval-mode softmax on the training images, from the file.
  loaded = convert.load_converted(ckpt)
  feats = models.create_backbone("resnet_small").apply(
      loaded["backbone"], jnp.asarray(outside.eval_images(run.data.train)), train=False)
  logits = np.asarray(feats, np.float64) @ loaded["source_head"]["kernel"] + \
      loaded["source_head"]["bias"]
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
  expected = {}
  for calibrate in (False, True):
    expected[calibrate], info = relationship.reverse_relationship(
        train_probs=probs[fit], train_labels=labels[fit], val_probs=probs[val],
        val_labels=labels[val], num_classes=CLASSES, calibrate=calibrate)
    # Measured 2.5e-7: the source probabilities differ only by float32 reordering.
    np.testing.assert_allclose(matrices[calibrate], expected[calibrate], rtol=0,
                               atol=1e-5, err_msg=f"seed {SEED}, calibrate={calibrate}")
  assert info["temperature"] != pytest.approx(1.0, abs=0.05), info["temperature"]
  gap = np.abs(matrices[True] - matrices[False]).max()
  assert gap > 1e-2, (SEED, gap)  # measured 0.027; 1000x the tolerance above
