"""Unsupervised fine-tuning: CutMix boxes and lambda, source replay, grouped BatchNorm,
the MoCo step on 8 devices, and feature evaluation in the loop. The step against NumPy
float64 from a perturbed state (key encoder != query encoder, a random queue
pointer): the EMA of the key encoder, the keys enqueued behind the pointer, InfoNCE of
the plain and of the CutMix queries (per-example lambda, mixed with the previous
query) and the total (the harness and the references are in `method_references.py`).
"""


import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
import method_references
import outside
from bitune_jax import methods, sharding
from bitune_jax.data import input as input_lib
from bitune_jax.data import pipeline
from bitune_jax.data.spec import Needs
from bitune_jax.data.views import cutmix
from bitune_jax.methods import common, unsup_finetune
from bitune_jax.training import loop

RTOL = method_references.RTOL


def _config(**unsup):
  # Evaluated at the end only (test_loop_evaluates_features checks the final step's).
  return fakes.tiny_config("unsup_finetune", total_steps=4, log_every=2, eval_every=4,
                           checkpoint_every=2,
                           unsup={"queue_size": 64, "bn_group_size": 4, **unsup})


def test_box_mask_by_hand():
  boxes = tuple(jnp.array([v]) for v in (1, 3, 0, 2))  # rows 1-2, columns 0-1
  mask = np.asarray(cutmix.box_mask(boxes, height=4, width=4))[0, :, :, 0]
  expected = np.ones((4, 4))
  expected[1:3, 0:2] = 0
  np.testing.assert_array_equal(mask, expected)


def test_cutmix_pixels_and_lambda_is_the_area_of_the_first_image(rng):
  a = jnp.asarray(rng.uniform(1, 2, (64, 12, 10, 3)), jnp.float32)
  b = jnp.asarray(rng.uniform(-2, -1, (64, 12, 10, 3)), jnp.float32)
  mixed, lam = cutmix.cutmix(jax.random.PRNGKey(int(rng.integers(1 << 30))), a, b)
  from_a = np.asarray(mixed > 0)[..., 0]  # a is positive, b negative
  np.testing.assert_allclose(from_a.mean(axis=(1, 2)), np.asarray(lam), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(mixed)[from_a], np.asarray(a)[from_a])
  np.testing.assert_array_equal(np.asarray(mixed)[~from_a], np.asarray(b)[~from_a])
  # Each pasted region is one axis-aligned rectangle.
  for m in ~from_a:
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if rows.size:
      assert m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
  # The distribution of the area-corrected lambda, against a NumPy Monte Carlo of
  # CutMix's box rule (lambda ~ Beta(1, 1), side sqrt(1 - lambda), clipped at edges).
  # 8000 draws as 125 batches of 64, the batch above: its programs (the Beta sampler
  # is 1-2 s of compilation per shape) serve them all.
  many = np.concatenate([cutmix.cutmix_boxes(key, batch=64, height=32, width=32)[1]
                         for key in jax.random.split(jax.random.PRNGKey(0), 125)])
  lam0 = rng.beta(1.0, 1.0, 200_000)
  cut = np.floor(32 * np.sqrt(1 - lam0)).astype(int)
  cy, cx = rng.integers(0, 32, (2, lam0.size))
  h = np.clip(cy + cut // 2, 0, 32) - np.clip(cy - cut // 2, 0, 32)
  w = np.clip(cx + cut // 2, 0, 32) - np.clip(cx - cut // 2, 0, 32)
  reference = 1 - h * w / 1024
  many = np.asarray(many)
  assert many.min() >= 0 and many.max() <= 1
  assert many.mean() == pytest.approx(reference.mean(), abs=0.01)
  assert np.median(many) == pytest.approx(np.median(reference), abs=0.02)


def test_source_replay_fraction_is_honoured():
  config = _config(replay_fraction=0.1)
  data = input_lib.load(config, methods.data_needs(config))
  target = len(data.train)
  replay = int(data.pool_is_replay.sum())
  assert replay == round(0.1 * 631)  # 10% of the digits 0-4 training split
  assert len(data.pool) == target + replay
  seen = [pipeline.stream_indices(len(data.pool), step=s, batch_size=16, seed=(0, 0))
          for s in range(60)]
  share = data.pool_is_replay[np.concatenate(seen)].mean()
  assert share == pytest.approx(replay / (target + replay), abs=0.03)
  # Replayed examples reach the batches unlabelled (-1).
  labels = np.concatenate([b["label"] for _, b in zip(range(60), data.train_batches(0))])
  assert (labels == -1).mean() == pytest.approx(share, abs=1e-9)
  assert not input_lib.load(_config(replay_fraction=0.0), Needs(views="two")).pool_is_replay.any()


def test_grouped_batchnorm_is_per_group():
  config = _config()
  model = unsup_finetune.build_model(config, 5)
  images = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 3))
  # Each function jitted whole, as the train step runs it: op by op, each of the
  # model's operations is compiled alone (9 CPU s for this test, 4 jitted).
  params, stats = jax.jit(functools.partial(common.init_variables, model))(
      jax.random.PRNGKey(0), images[:1])
  out, new_stats = jax.jit(functools.partial(unsup_finetune.grouped_forward, model,
                                             group_size=4))(params, stats, images)
  forward = jax.jit(functools.partial(common.forward, model, train=True))
  parts = [forward(params, stats, images[i:i + 4]) for i in (0, 4)]
  np.testing.assert_allclose(out["projection"], np.concatenate(
      [p[0]["projection"] for p in parts]), rtol=1e-4, atol=1e-5)
  for got, a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(parts[0][1]),
                       jax.tree.leaves(parts[1][1])):
    np.testing.assert_allclose(got, (np.asarray(a) + np.asarray(b)) / 2, rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("use_cutmix", [True, False])
def test_trains_on_eight_devices(use_cutmix):
  """The run's own step (views made in it) on the loop's host batches: with CutMix
  (the demo's), the program test_loop_evaluates_features then reads back compiled."""
  config = _config(cutmix=use_cutmix)
  mesh = sharding.make_mesh()
  run = loop.setup(config, mesh)
  state = run.state
  for _, batch in zip(range(3), run.data.train_batches(0)):
    before = jax.device_get(state)
    state, metrics = run.train_step(state, sharding.global_batch(batch, mesh))
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["loss"])  # values: test_unsup_finetune_step_matches_numpy
  assert ("mixed_info_nce" in metrics) == use_cutmix
  after = jax.device_get(state)
  assert int(after.extras["queue"].ptr) == (3 * 16) % 64  # the keys went in
  m = config.unsup.ema_momentum  # the key encoder moved by the EMA rule
  k_before = before.key_params["backbone"]["conv1"]["kernel"]
  q_before = before.params["backbone"]["conv1"]["kernel"]
  np.testing.assert_allclose(after.key_params["backbone"]["conv1"]["kernel"],
                             m * k_before + (1 - m) * q_before, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(after.params["head"]["dense"]["kernel"],
                                before.params["head"]["dense"]["kernel"])  # lr 0


@pytest.mark.parametrize("seed, temperature, mixed_weight", [(5, 0.2, 1.0),
                                                             (6, 0.5, 0.5)])
def test_unsup_finetune_step_matches_numpy(seed, temperature, mixed_weight, monkeypatch):
  config = fakes.tiny_config("unsup_finetune", total_steps=4, unsup=dict(
      queue_size=64, bn_group_size=0, cutmix=True, temperature=temperature,
      mixed_weight=mixed_weight))
  mesh, run = method_references.setup(config, monkeypatch)
  rng = np.random.default_rng(seed)
  state = method_references.perturbed(run, rng)
  batch = next(iter(run.data.train_batches(0)))
  before, _, metrics, after = method_references.one_step(run, mesh, state, batch)
  msg = f"seed {seed}"

  key_params = method_references.expected_ema(before, config.unsup.ema_momentum)
  method_references.assert_tree_close(after.key_params, key_params, rtol=1e-6, atol=1e-7,
                                      what=f"{msg} key_params")
  # Whole-batch BatchNorm: the keys do not depend on the shuffle, so each row must be
  # its own image's key again (unshuffled).
  key_out, key_stats = method_references.forward(run.model, key_params,
                                                 before.key_batch_stats, batch["image_k"])
  k = method_references.normalize(np, key_out["projection"])  # [B, D]
  method_references.assert_tree_close(after.key_batch_stats, key_stats, rtol=1e-4,
                                      atol=1e-5, what=f"{msg} key_batch_stats")
  old, new = before.extras["queue"], after.extras["queue"]
  slots = (int(old.ptr) + np.arange(16)) % 64
  np.testing.assert_allclose(new.keys[slots], k, rtol=1e-4, atol=1e-5, err_msg=msg)
  np.testing.assert_array_equal(np.delete(new.keys, slots, 0),
                                np.delete(old.keys, slots, 0), err_msg=msg)
  assert int(new.ptr) == (int(old.ptr) + 16) % 64, msg

  # Query i is mixed with query i-1; lambda per example from the step's mix rng.
  _, _, mix_rng = jax.random.split(before.rng, 3)
  images = batch["image_q"]
  mixed, lam = cutmix.cutmix(mix_rng, images, np.roll(images, 1, axis=0),
                             alpha=config.unsup.cutmix_alpha)
  lam = np.float64(lam)
  assert lam.shape == (16,) and np.ptp(lam) > 0.1, msg  # per example, not a constant
  out, _ = method_references.forward(run.model, before.params, before.batch_stats,
                                     np.concatenate([images, np.asarray(mixed)]))
  z = method_references.normalize(np, out["projection"])
  queue = np.float64(old.keys)
  info_nce = method_references.info_nce
  plain = np.mean(info_nce(z[:16], k, queue, temperature))
  mixed_loss = np.mean(lam * info_nce(z[16:], k, queue, temperature)
                       + (1 - lam) * info_nce(z[16:], np.roll(k, 1, axis=0), queue,
                                              temperature))
  np.testing.assert_allclose(metrics["info_nce"], plain, rtol=RTOL, err_msg=msg)
  np.testing.assert_allclose(metrics["mixed_info_nce"], mixed_loss, rtol=RTOL,
                             err_msg=msg)
  np.testing.assert_allclose(metrics["loss"], plain + mixed_weight * mixed_loss,
                             rtol=RTOL, err_msg=msg)


def test_loop_evaluates_features(tmp_path):
  config = _config()
  state, summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary["step"] == 4 and "top1" not in summary
  # The protocols recomputed from outside, on the final state's eval-mode features.
  data = input_lib.load(config, methods.data_needs(config))
  model = unsup_finetune.build_model(config, 5)
  train_f, test_f = (
      outside.eval_outputs(model, state.params, state.batch_stats, outside.eval_images(split))["features"]
      for split in (data.train, data.test))
  outside.check_feature_metrics(summary, (train_f, data.train.labels),
                                (test_f, data.test.labels), num_classes=5)
