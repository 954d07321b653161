"""DELTA: the attention-weighted feature-map penalty and the channel attention against
NumPy, and a real step's penalty recomputed from its forward outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from bitune_jax import sharding, train
from bitune_jax.methods import delta


def _np_penalty(stages, reference, attention):
  total = 0.0
  for name, w in attention.items():
    d = np.float64(stages[name]) - np.float64(reference[name])
    total += np.sum(np.float64(w) * np.mean(np.sum(d ** 2, axis=(1, 2)), axis=0))
  return total


def test_feature_map_penalty_matches_numpy(rng):
  shapes = {"layer1": (3, 5, 4, 6), "layer2": (3, 2, 3, 7)}
  stages = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
  reference = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
  attention = {n: rng.dirichlet(np.ones(s[-1])).astype(np.float32)
               for n, s in shapes.items()}
  got = delta.feature_map_penalty(stages, reference, attention)
  np.testing.assert_allclose(float(got), _np_penalty(stages, reference, attention),
                             rtol=1e-5)
  # The gradient reaches the trained maps (2 W_c (FM - FM*) / B), not the reference.
  grads = jax.grad(delta.feature_map_penalty, argnums=(0, 1))(stages, reference,
                                                              attention)
  for n in shapes:
    expected = 2 * attention[n] * (stages[n] - reference[n]) / shapes[n][0]
    np.testing.assert_allclose(grads[0][n], expected, rtol=1e-4, atol=1e-6)
    assert not np.any(grads[1][n])


def test_channel_attention_matches_numpy(rng):
  """A two-stage toy network: for each stage and channel, the mean increase of the
  per-example cross-entropy when that channel is zeroed (padding rows left out),
  over two batches, then a softmax over the stage's channels with a temperature."""
  d, c1, c2, classes = 4, 5, 3, 3
  a = rng.normal(size=(d, c1))
  b = rng.normal(size=(c1, c2))
  k = rng.normal(size=(c2, classes)) * 2

  def np_losses(x, y, scale):
    s1 = np.maximum(x @ a, 0) * scale["a"]
    s2 = np.maximum(s1 @ b, 0) * scale["b"]
    logits = s2 @ k
    logits = logits - logits.max(1, keepdims=True)
    return -(logits[np.arange(len(y)), y] - np.log(np.exp(logits).sum(1)))

  def losses_fn(batch, scale):
    s1 = jax.nn.relu(batch["x"] @ jnp.float32(a)) * scale["a"]
    s2 = jax.nn.relu(s1 @ jnp.float32(b)) * scale["b"]
    logp = jax.nn.log_softmax(s2 @ jnp.float32(k))
    return -jnp.take_along_axis(logp, batch["label"][:, None], 1)[:, 0] * batch["mask"]

  batches = []
  for size, pad in ((6, 2), (4, 0)):
    batches.append({"x": rng.normal(size=(size, d)).astype(np.float32),
                    "label": rng.integers(0, classes, size).astype(np.int32),
                    "mask": np.r_[np.ones(size - pad), np.zeros(pad)].astype(np.float32)})
  weights, increase = delta.channel_attention(losses_fn, batches, {"a": c1, "b": c2},
                                              temperature=0.5, chunk=2)
  for name, channels in (("a", c1), ("b", c2)):
    expected = np.zeros(channels)
    count = 0
    for batch in batches:
      real = batch["mask"] > 0
      x, y = np.float64(batch["x"][real]), batch["label"][real]
      ones = {"a": np.ones(c1), "b": np.ones(c2)}
      base = np_losses(x, y, ones)
      for ch in range(channels):
        scale = {n: v.copy() for n, v in ones.items()}
        scale[name][ch] = 0
        expected[ch] += np.sum(np_losses(x, y, scale) - base)
      count += real.sum()
    expected /= count
    np.testing.assert_allclose(increase[name], expected, rtol=1e-4, atol=1e-6)
    z = expected / 0.5
    soft = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(weights[name], soft, rtol=1e-4, atol=1e-7)
    assert weights[name].sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_a_delta_step_penalises_the_attention_weighted_distance_to_w_star(rng):
  """A tiny DELTA run: after `prepare`, w* is the backbone it started from and the
  attention of each stage (layer1..layer3 of resnet_small) is a distribution; after
  two steps, the third step's feature-map distance equals the one recomputed here
  from the model's own train-mode maps and w*'s eval-mode maps, and its loss is CE +
  alpha * distance + beta / 2 * ||head||^2."""
  config = fakes.tiny_config("delta", delta={"alpha": 0.5, "beta": 0.1,
                                             "attention_batches": 1})
  mesh = sharding.make_mesh()
  run = train.setup(config, mesh)
  state = run.state
  start = jax.device_get(state)
  attention = start.extras["attention"]
  assert sorted(attention) == ["layer1", "layer2", "layer3"]
  for w in attention.values():
    assert np.all(w > 0) and float(np.sum(w)) == pytest.approx(1.0, abs=1e-5)
    assert np.ptp(w) > 0  # measured, not the uniform placeholder
  jax.tree.map(np.testing.assert_array_equal, start.extras["w0"],
               start.params["backbone"])
  batches = iter(run.data.train_batches(0))
  for _ in range(2):
    state, _ = run.train_step(state, sharding.global_batch(next(batches), mesh))
  before = jax.device_get(state)
  batch = next(batches)
  views = jax.device_get(jax.jit(run.data.views)(batch, before.step))
  images = views["image"]
  step = jax.jit(run.method_step)
  _, metrics = step(state, sharding.global_batch({"image": images,
                                                   "label": batch["label"]}, mesh))
  metrics = jax.device_get(metrics)
  model = run.model
  ours = model.apply({"params": before.params, "batch_stats": before.batch_stats},
                     images, train=True, stages=True, mutable=["batch_stats"])[0]
  ref_vars = {"params": dict(before.params, backbone=before.extras["w0"]),
              "batch_stats": dict(before.batch_stats,
                                  backbone=before.extras["w0_stats"])}
  theirs = model.apply(ref_vars, images, train=False, stages=True)
  expected = _np_penalty(ours["stages"], theirs["stages"], before.extras["attention"])
  assert expected > 0
  np.testing.assert_allclose(metrics["feature_map_distance"], expected, rtol=1e-3)
  head = sum(float(np.sum(np.float64(x) ** 2))
             for x in jax.tree.leaves(before.params["head"]))
  np.testing.assert_allclose(metrics["head_sq_norm"], head, rtol=1e-5)
  np.testing.assert_allclose(
      metrics["loss"], metrics["ce"] + 0.5 * expected + 0.05 * head, rtol=1e-4)


@pytest.mark.parametrize("arch, expected", [
    ("resnet50", {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}),
    ("densenet121", {"denseblock1": 256, "denseblock2": 512, "denseblock3": 1024,
                     "denseblock4": 1024})])
def test_stages_of_the_papers_backbones(arch, expected):
  """The stages DELTA regularises (shapes only): the outputs of the four stages."""
  config = fakes.tiny_config("delta", arch=arch)
  model = delta.build_model(config, 10)
  assert delta.stage_channels(model, jnp.zeros((1, 64, 64, 3))) == expected
