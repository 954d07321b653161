"""FixMatch: the masked pseudo-label loss against NumPy, a real step on 8 devices
(labelled and unlabelled streams, weak and strong views, the loss and update) against
NumPy float64, and the demo's data: k labelled images per class beside every training
image unlabelled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
import method_references
from bitune_jax import losses, sharding
from bitune_jax.training import loop
from bitune_jax.training import export as export_lib

RTOL = method_references.RTOL


def _numpy_fixmatch(weak, strong, threshold, valid=None):
  """Sohn et al.'s l_u in float64, one example at a time; the confidence compared with
  the threshold is float32's, as the step computes it (at threshold 1.0 a softmax that
  float64 puts at 1 - 1e-8 is exactly 1 in float32: seed 5190799)."""
  total, used = 0.0, 0
  count = len(weak) if valid is None else int(np.sum(valid))
  for i, (w, s) in enumerate(zip(weak, strong)):
    if valid is not None and not valid[i]:
      continue
    w32 = np.float32(w)
    q = np.exp(w32 - w32.max())
    q /= q.sum()
    if q.max() >= threshold:
      log_p = s - s.max() - np.log(np.sum(np.exp(s - s.max())))
      total -= log_p[np.argmax(q)]
      used += 1
  return total / max(count, 1), used / max(count, 1)


@pytest.mark.parametrize("threshold", [0.0, 0.6, 0.95, 1.0])
def test_fixmatch_loss_matches_numpy(rng, threshold):
  weak = rng.standard_normal((24, 7)) * 3  # some confident, some not
  weak[:4, 2] += 12  # surely confident
  strong = rng.standard_normal((24, 7))
  loss, rate = losses.fixmatch_loss(logits_weak=jnp.float32(weak),
                                    logits_strong=jnp.float32(strong), threshold=threshold)
  expected, expected_rate = _numpy_fixmatch(weak, strong, threshold)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(rate, expected_rate, rtol=1e-6)
  if 0 < threshold < 1:
    assert 0 < expected_rate < 1  # the mask matters in this case
  valid = rng.random(24) < 0.7
  loss, rate = losses.fixmatch_loss(logits_weak=jnp.float32(weak),
                                    logits_strong=jnp.float32(strong), threshold=threshold,
                                    valid=jnp.asarray(valid))
  expected, expected_rate = _numpy_fixmatch(weak, strong, threshold, valid)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(rate, expected_rate, rtol=1e-6)


def test_fixmatch_loss_gradient_flows_through_the_strong_view_only(rng):
  weak, strong = rng.standard_normal((8, 5)) * 4, rng.standard_normal((8, 5))
  grad_w, grad_s = jax.grad(lambda w, s: losses.fixmatch_loss(
      logits_weak=w, logits_strong=s, threshold=0.5)[0], argnums=(0, 1))(
          jnp.float32(weak), jnp.float32(strong))
  assert np.all(np.asarray(grad_w) == 0) and np.any(np.asarray(grad_s) != 0)
  with pytest.raises(ValueError, match="threshold"):
    losses.fixmatch_loss(logits_weak=jnp.float32(weak), logits_strong=jnp.float32(strong),
                         threshold=1.5)
  with pytest.raises(ValueError, match="one shape"):
    losses.fixmatch_loss(logits_weak=jnp.float32(weak),
                         logits_strong=jnp.float32(strong[:4]))


@pytest.mark.parametrize("threshold, weight", [(0.25, 1.0), (0.3, 2.5)])
def test_fixmatch_step_matches_numpy(threshold, weight, monkeypatch):
  """A real step: the data (k-shot labelled; every training image, labels hidden,
  mu times as many), the views, and the loss and update against NumPy."""
  config = fakes.tiny_config("fixmatch", fixmatch=dict(threshold=threshold, mu=2,
                                                       unlabelled_weight=weight))
  mesh, run = method_references.setup(config, monkeypatch)
  data = run.data
  assert len(data.train) == 4 * 5 and np.all(np.bincount(data.train.labels) == 4)
  assert np.all(data.unlabelled.labels == -1) and len(data.unlabelled) > 4 * len(
      data.train)
  batch = next(iter(data.train_batches(0)))
  assert batch["u_image_u8"].shape[0] == 2 * batch["image_u8"].shape[0] == 32
  assert "u_label" not in batch  # the unlabelled stream's labels never reach the step
  before, _, metrics, after = method_references.one_step(run, mesh, run.state, batch)
  # The weak and strong views differ; the weak labelled view is not the eval view.
  assert np.abs(batch["u_weak"] - batch["u_strong"]).mean() > 0.1
  images = np.concatenate([batch["image"], batch["u_weak"], batch["u_strong"]])
  out, stats = method_references.forward(run.model, before.params, before.batch_stats,
                                         images)
  logits, labels = out["logits"], batch["label"]
  ce = method_references.cross_entropy(logits[:16], labels)
  l_u, rate = _numpy_fixmatch(logits[16:48], logits[48:], threshold)
  np.testing.assert_allclose(metrics["ce"], ce, rtol=RTOL)
  np.testing.assert_allclose(metrics["unlabelled"], l_u, rtol=RTOL, atol=1e-7)
  np.testing.assert_allclose(metrics["mask_rate"], rate, atol=1e-6)
  assert 0 < rate < 1  # the threshold keeps some pseudo-labels and drops others
  np.testing.assert_allclose(metrics["loss"], ce + weight * l_u, rtol=RTOL)
  method_references.assert_tree_close(after.batch_stats, stats, rtol=1e-4, atol=1e-5,
                                      what="batch_stats (over all B + 2U images)")

  def loss_fn(params, x):
    from bitune_jax.methods import common  # pylint: disable=g-import-not-at-top
    o, _ = common.forward(run.model, params, before.batch_stats, x, train=True)
    lg = o["logits"]
    log_p = jax.nn.log_softmax(lg)
    q = jax.nn.softmax(jax.lax.stop_gradient(lg[16:48]))
    keep = jnp.max(q, -1) >= threshold
    nll = -jnp.take_along_axis(log_p[48:], jnp.argmax(q, -1)[:, None], -1)[:, 0]
    return (-jnp.mean(log_p[jnp.arange(16), labels])
            + weight * jnp.sum(jnp.where(keep, nll, 0.0)) / 32)
  x = sharding.global_batch({"x": images.astype(np.float32)}, mesh)["x"]
  grads = jax.device_get(jax.jit(jax.grad(loss_fn))(before.params, x))
  method_references.check_update(config, before, after, grads, f"threshold {threshold}")


@pytest.mark.slow
def test_fixmatch_trains_from_an_unsupervised_fine_tuning_run(tmp_path):
  """Table 5's "+ Our Unsupft-T" path: an unsup_finetune run (2 steps, as in
  test_cli_eval.py's k-shot test: one compiled run for both files), exported by
  bitune-export, is FixMatch's init_from: the state FixMatch starts from holds that
  backbone exactly; then FixMatch trains on the demo and logs its terms."""
  import json  # pylint: disable=g-import-not-at-top
  from bitune_jax import convert  # pylint: disable=g-import-not-at-top
  from bitune_jax.training import events  # pylint: disable=g-import-not-at-top
  unsup = fakes.tiny_config("unsup_finetune", total_steps=2, unsup=dict(queue_size=64))
  loop.train_and_evaluate(unsup, str(tmp_path / "unsup"))
  exported = str(tmp_path / "unsupft.npz")
  export_lib.export_workdir(str(tmp_path / "unsup"), exported)
  backbone = convert.load_converted(exported)["backbone"]
  # The run's start, as train_and_evaluate builds it (loop.setup), without a run.
  config = fakes.tiny_config("fixmatch", init_from=exported)
  start = loop.setup(config, sharding.make_mesh()).state
  got = jax.tree.leaves(jax.device_get(start.params["backbone"]))
  want = jax.tree.leaves(backbone["params"])
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  config = fakes.tiny_config("fixmatch", init_from=exported, total_steps=4,
                             log_every=2, eval_every=4, checkpoint_every=4)
  _, summary = loop.train_and_evaluate(config, str(tmp_path / "fixmatch"))
  assert summary["step"] == 4 and summary["method"] == "fixmatch"
  scalars = events.read_scalars(str(tmp_path / "fixmatch"))
  assert {"ce", "unlabelled", "mask_rate", "loss"} <= set(scalars)
  assert [s for s, _ in scalars["mask_rate"]] == [2, 4]
  recorded = json.loads((tmp_path / "fixmatch" / "config.json").read_text())
  assert recorded["init_from"] == exported
