"""DELTA: the attention-weighted feature-map penalty and the channel attention against
NumPy, and a real step's penalty recomputed from its forward outputs."""

import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from bitune_jax import sharding
from bitune_jax.methods import delta
from bitune_jax.training import loop


def _np_penalty(stages, reference, attention):
  """TLlib's formula, transliterated in its NCHW layout: per map
  `0.5 * sum_{b,c} C * W_c * ||FM_bc - FM*_bc||_2^2 / (H*W)`."""
  total = 0.0
  for name, w in attention.items():
    fm_t = np.float64(stages[name]).transpose(0, 3, 1, 2)
    fm_s = np.float64(reference[name]).transpose(0, 3, 1, 2)
    b, c, h, wd = fm_s.shape
    distance = np.linalg.norm((fm_t - fm_s).reshape(b, c, h * wd), axis=2)  # [B, C]
    total += 0.5 * np.sum(c * np.float64(w)[None] * distance ** 2 / (h * wd))
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
  # The gradient reaches the trained maps (C W_c (FM - FM*) / (H W)), not the reference.
  grads = jax.grad(delta.feature_map_penalty, argnums=(0, 1))(stages, reference,
                                                              attention)
  for n, (_, h, w, c) in shapes.items():
    expected = c * attention[n] * (stages[n] - reference[n]) / (h * w)
    np.testing.assert_allclose(grads[0][n], expected, rtol=1e-4, atol=1e-6)
    assert not np.any(grads[1][n])


def test_channel_attention_matches_numpy(rng):
  """A two-stage toy network: for each stage and channel, the increase of the batch's
  mean cross-entropy when that channel is zeroed (padding rows left out), averaged
  over two batches of different sizes (a mean of per-batch means, as TLlib), then a
  softmax of the z-scored increases over the stage's channels with a temperature."""
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

  def losses_fn(network, batch, scale):
    s1 = jax.nn.relu(batch["x"] @ network["a"]) * scale["a"]
    s2 = jax.nn.relu(s1 @ network["b"]) * scale["b"]
    logp = jax.nn.log_softmax(s2 @ network["k"])
    return -jnp.take_along_axis(logp, batch["label"][:, None], 1)[:, 0] * batch["mask"]

  batches = []
  for size, pad in ((6, 2), (4, 0)):
    batches.append({"x": rng.normal(size=(size, d)).astype(np.float32),
                    "label": rng.integers(0, classes, size).astype(np.int32),
                    "mask": np.r_[np.ones(size - pad), np.zeros(pad)].astype(np.float32)})
  network = {"a": jnp.float32(a), "b": jnp.float32(b), "k": jnp.float32(k)}
  weights, increase = delta.channel_attention(losses_fn, network, batches,
                                              {"a": c1, "b": c2},
                                              temperature=0.5, chunk=2)
  for name, channels in (("a", c1), ("b", c2)):
    expected = np.zeros(channels)
    for batch in batches:
      real = batch["mask"] > 0
      x, y = np.float64(batch["x"][real]), batch["label"][real]
      ones = {"a": np.ones(c1), "b": np.ones(c2)}
      base = np_losses(x, y, ones)
      for ch in range(channels):
        scale = {n: v.copy() for n, v in ones.items()}
        scale[name][ch] = 0
        expected[ch] += np.mean(np_losses(x, y, scale) - base)
    expected /= len(batches)
    np.testing.assert_allclose(increase[name], expected, rtol=1e-4, atol=1e-6)
    z = (expected - expected.mean()) / expected.std() / 0.5
    soft = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(weights[name], soft, rtol=1e-4, atol=1e-7)
    assert weights[name].sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_a_delta_step_penalises_the_attention_weighted_distance_to_w_star(rng):
  """A tiny DELTA run: after `prepare`, w* is the backbone it started from and the
  attention of each map (the last conv of layer1..layer3 of resnet_small) is a
  distribution; after
  two steps, the third step's feature-map distance equals the one recomputed here
  from the model's own train-mode maps and w*'s eval-mode maps, and its loss is CE +
  alpha * distance + beta / 2 * ||head||^2."""
  config = fakes.tiny_config("delta", delta={"alpha": 0.5, "beta": 0.1,
                                             "attention_batches": 1})
  mesh = sharding.make_mesh()
  run = loop.setup(config, mesh)
  state = run.state
  start = jax.device_get(state)
  attention = start.extras["attention"]
  assert sorted(attention) == [f"layer{i}_last_conv" for i in (1, 2, 3)]
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
  # The run's own step (compiled once for the three), on the views it makes of the
  # batch, which are these.
  images = jax.device_get(jax.jit(run.data.views)(batch, before.step))["image"]
  _, metrics = run.train_step(state, sharding.global_batch(batch, mesh))
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
  # The head's term alone (beta / 2, not beta): alpha * distance dominates the loss
  # (~1000 against ~0.08), so it is checked from the terms the step reports, to a few
  # float32 ulps of the loss.
  rest = float(metrics["loss"]) - float(metrics["ce"]) - 0.5 * float(
      metrics["feature_map_distance"])
  np.testing.assert_allclose(rest, 0.05 * head,
                             atol=16 * np.finfo(np.float32).eps * abs(metrics["loss"]))


_WIDTHS = {"resnet50": ("layer", (256, 512, 1024, 2048)),
           "densenet121": ("denseblock", (256, 512, 1024, 1024))}


@pytest.mark.parametrize("arch", sorted(_WIDTHS))
@pytest.mark.parametrize("feature_maps", ["last_conv", "stage_output"])
def test_maps_of_the_papers_backbones(arch, feature_maps):
  """The maps DELTA regularises (shapes only): four per backbone, named by stage, the
  last conv's output before its BatchNorm or the stage's output."""
  config = fakes.tiny_config("delta", arch=arch)
  model = delta.METHOD.build_model(config, 10)
  prefix, widths = _WIDTHS[arch]
  suffix = "_last_conv" if feature_maps == "last_conv" else ""
  expected = {f"{prefix}{i + 1}{suffix}": w for i, w in enumerate(widths)}
  assert delta.stage_channels(model, jnp.zeros((1, 64, 64, 3)), feature_maps) == expected


# ------------------------------------------------------------- against TLlib's DELTA
def _torch_resnet50_pair(seed, num_classes):
  """A random ResNet-50 (the source, eval mode) and a copy moved a little away from it
  (the network being fine-tuned, train mode), in float64."""
  import copy  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch_models  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(seed)
  source = torch_models.randomize_(torch_models.resnet50(num_classes), generator)
  source = source.double().eval()
  target = copy.deepcopy(source).train()
  with torch.no_grad():
    for p in target.parameters():
      p.add_(0.05 * p.std() * torch.randn(p.shape, generator=generator,
                                          dtype=torch.float64))
  return source, target


def _flax_variables(torch_model):
  from bitune_jax.convert import mapping  # pylint: disable=g-import-not-at-top
  tensors = {k: v.float().numpy() for k, v in torch_model.state_dict().items()}
  backbone, heads, _ = mapping.map_backbone("resnet50", tensors)
  head = {"dense": {"kernel": heads["fc"]["weight"].T, "bias": heads["fc"]["bias"]}}
  return {"params": {"backbone": backbone["params"], "head": head},
          "batch_stats": {"backbone": backbone["batch_stats"]}}


@pytest.fixture(scope="module")
def resnet50():
  """`(config, model, source, target, w_star, seed)`: `configs/delta.py`'s ResNet-50
  for 7 classes, one random PyTorch pair (`_torch_resnet50_pair`) and the source's
  weights in our layout (`_flax_variables`), built once for both comparisons with
  TLlib (6 s of CPU each time). Seeded as the `rng` fixture is; each test draws its
  inputs from the same seed and reports it: `BITUNE_TEST_SEED=<seed>` reruns it all."""
  from bitune_jax.configs.delta import get_config  # pylint: disable=g-import-not-at-top
  seed = int(os.environ.get("BITUNE_TEST_SEED") or secrets.randbits(32))
  config = get_config("cub,resnet50,100")
  source, target = _torch_resnet50_pair(seed % (1 << 31), 7)
  return (config, delta.METHOD.build_model(config, 7), source, target,
          _flax_variables(source), seed)


def _inputs_rng(request, seed, salt):
  """The test's own draws (images, labels, channel weights), from the pair's seed."""
  request.node.user_properties.append(("seed", seed))
  return np.random.default_rng([seed, salt])


def test_configs_delta_penalty_is_tllibs_on_resnet50(resnet50, request):
  """`configs/delta.py`'s penalty on a ResNet-50 against a PyTorch transliteration of
  TLlib's DELTA (third_party/delta_reference.py) on the same weights and images, with
  random channel weights: the maps are each stage's last conv3 output before bn3
  (hooks on TLlib's `layer<i>.<last>.conv3`), the network in train mode, w* in eval
  mode; penalty within 1e-4 relative (float32 here, float64 there)."""
  import torch  # pylint: disable=g-import-not-at-top
  import delta_reference as ref  # pylint: disable=g-import-not-at-top
  config, model, source, target, w_star, seed = resnet50
  rng = _inputs_rng(request, seed, 1)
  trained = _flax_variables(target)
  images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2)).double()
  ours_t = model.apply(trained, images, train=True, stages=True,
                       mutable=["batch_stats"])[0]["stages"]
  ours_s = model.apply(w_star, images, train=False, stages=True)["stages"]
  maps = delta.regularised_maps(ours_s, config.delta.feature_maps)
  assert sorted(maps) == [f"layer{i}_last_conv" for i in range(1, 5)]
  attention = {n: rng.dirichlet(np.ones(m.shape[-1])).astype(np.float32)
               for n, m in maps.items()}
  with torch.no_grad():
    _, theirs_t = ref.hooked_maps(target, ref.last_convs(target), x)
    _, theirs_s = ref.hooked_maps(source, ref.last_convs(source), x)
    expected = ref.penalty(theirs_t, theirs_s, {
        n.removesuffix("_last_conv"): torch.from_numpy(np.float64(w))
        for n, w in attention.items()}).item()
  for name, theirs in theirs_s.items():  # the same maps, before BN and ReLU
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours_s[f"{name}_last_conv"], theirs, rtol=1e-4,
                               atol=1e-4 * np.abs(theirs).max())
    assert np.mean(theirs < 0) > 0.2
  got = float(delta.feature_map_penalty(ours_t, ours_s, attention))
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_configs_delta_attention_is_tllibs_on_resnet50(resnet50, request):
  """`configs/delta.py`'s channel attention on a ResNet-50 against the PyTorch
  transliteration of TLlib's: with the network's own fc as the classifier (eval mode),
  the loss increase D of every channel of the first conv3 map (ours: a padded batch
  of 2 + 1; theirs: 2 images) within 1e-3 of D's spread, and the attention
  softmax(zscore(D) / 5) within 1e-4 relative. The reference's fast path (zeroing the
  conv's output channel on replicas) is checked against literally zeroing its weight
  row on a few channels. Tiny 8 px images: the cost is the parameters x channels."""
  import torch  # pylint: disable=g-import-not-at-top
  import delta_reference as ref  # pylint: disable=g-import-not-at-top
  config, model, source, _, w_star, seed = resnet50
  rng = _inputs_rng(request, seed, 2)
  images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 7, 2)
  head = w_star["params"]["head"]["dense"]
  network = (w_star, jnp.asarray(head["kernel"]), jnp.asarray(head["bias"]))
  batches = [{"image": np.concatenate([images, images[:1]]),  # padded to 3
              "label": np.r_[labels, 0].astype(np.int32),
              "mask": np.array([1.0, 1.0, 0.0], np.float32)}]
  channels = delta.stage_channels(model, jnp.zeros((1, 8, 8, 3)),
                                  config.delta.feature_maps)
  assert len(channels) == 4
  # The first map (256 channels): every map takes the same code path, and the cost is
  # the channels x the parameters (layer4's 2048 channels took 4/5 of this test).
  channels = {"layer1_last_conv": channels["layer1_last_conv"]}
  assert config.delta.attention_temperature == 5.0
  weights, increases = delta.channel_attention(
      delta.attention_losses_fn(model), network, batches, channels,
      temperature=config.delta.attention_temperature)
  torch_batches = [(torch.from_numpy(images.transpose(0, 3, 1, 2)).double(),
                    torch.from_numpy(labels))]
  convs = ref.last_convs(source)
  theirs = ref.loss_increases(source, {"layer1": convs["layer1"]}, torch_batches)
  for name, some in (("layer1", [0, 200]),):
    literal = ref.loss_increases_by_zeroing(source, convs[name], torch_batches, some)
    # atol: a channel whose zeroing changes nothing gives 0 one way, 1.8e-15 the other.
    np.testing.assert_allclose(literal, theirs[name][some], rtol=1e-9, atol=1e-12)
  for name, d in theirs.items():
    np.testing.assert_allclose(increases[f"{name}_last_conv"], d, rtol=0,
                               atol=1e-3 * np.std(d))
    w = weights[f"{name}_last_conv"]
    np.testing.assert_allclose(w, ref.attention_from_increases(d), rtol=1e-4)
    assert np.max(w) / np.min(w) > 1.5  # the attention is not near uniform
