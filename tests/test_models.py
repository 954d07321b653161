"""Backbones and heads: shapes, parameter counts, train mode, sharded BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bitune_jax import models
from bitune_jax.models import vit

# torchvision's parameter counts minus the final Linear (F * 1000 + 1000).
PARAMS = {"resnet18": 11_689_512 - 513_000, "resnet34": 21_797_672 - 513_000,
          "resnet50": 25_557_032 - 2_049_000, "resnet101": 44_549_160 - 2_049_000,
          "resnet152": 60_192_808 - 2_049_000, "densenet121": 7_978_856 - 1_025_000,
          # SimCLR v1's wider ResNet-50s (its paper: 94M and 375M parameters).
          "resnet50x2": 93_907_072, "resnet50x4": 375_378_176,
          # 3x3x3x16 stem + BN, stages of 2 BasicBlocks at 16/32/64 (1x1 downsamples).
          "resnet_small": 432 + 32 + 2 * (2 * (2304 + 32)) + (4608 + 64 + 9216 + 64
                                                               + 512 + 64 + 9216 + 64
                                                               + 9216 + 64)
                          + (18432 + 128 + 36864 + 128 + 2048 + 128 + 36864 + 128
                             + 36864 + 128)}



def _vit_params(patch, width, depth, mlp_dim, grid, clip=False, proj_dim=0, layer_scale=False,
                num_registers=0, **_):
  """A ViT's parameters counted by hand: the patch conv, class token, positions (and
  registers), per block two LayerNorms, qkv, proj, the MLP (and LayerScale), the final
  LayerNorm (and CLIP's bias-free conv, ln_pre and proj)."""
  d = width
  block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d * mlp_dim + mlp_dim + d
  return (patch * patch * 3 * d + (0 if clip else d) + d + (1 + grid * grid) * d
          + num_registers * d + depth * (block + (2 * d if layer_scale else 0)) + 2 * d
          + (2 * d + d * proj_dim if clip else 0))


PARAMS.update({arch: _vit_params(**v) for arch, v in vit.VARIANTS.items()})


def test_vit_counts_by_hand_are_timms_published_ones():
  # timm's published counts minus the 1000-way head (F * 1000 + 1000).
  assert PARAMS["vit_s16"] == 22_050_664 - 385_000
  assert PARAMS["vit_b16"] == 86_567_656 - 769_000
  assert PARAMS["vit_l16"] == 304_326_632 - 1_025_000


@pytest.mark.parametrize("arch", models.ARCHS)
def test_parameter_counts_and_feature_width(arch):
  model = models.create_backbone(arch)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)))
  assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == PARAMS[arch]
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes,
                       jnp.zeros((2, 64, 64, 3)))
  assert out.shape == (2, models.num_features(arch)) and out.dtype == jnp.float32


def test_train_mode_updates_batch_stats_and_heads():
  model = models.create_backbone("resnet18")
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  features, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  before = variables["batch_stats"]["bn1"]["mean"]
  after = updates["batch_stats"]["bn1"]["mean"]
  assert not np.allclose(before, after)  # momentum 0.9: 10% of the batch mean
  assert features.shape == (4, 512)
  logits = models.Classifier(10).apply(
      models.Classifier(10).init(jax.random.PRNGKey(2), features), features)
  projector = models.Projector(dim=128, hidden_dim=512)
  z = projector.apply(projector.init(jax.random.PRNGKey(3), features), features)
  assert logits.shape == (4, 10) and z.shape == (4, 128)


def test_bf16_activations_keep_float32_params():
  model = models.create_backbone("resnet18", dtype=jnp.bfloat16)
  images = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  assert model.apply(variables, images).dtype == jnp.float32


def test_sharded_batch_gives_global_batchnorm_statistics():
  """Train-mode BN under jit with the batch on 8 devices equals the unsharded result."""
  model = models.create_backbone("resnet18")
  images = jax.random.normal(jax.random.PRNGKey(1), (16, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), images[:1])
  step = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])  # noqa: E731
  plain = jax.jit(step)(variables, images)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded_images = jax.device_put(images, NamedSharding(mesh, P("data")))
  sharded = jax.jit(step)(jax.device_put(variables, NamedSharding(mesh, P())),
                          sharded_images)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded)):
    # Same math; the sharded reductions sum in another order.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-4 * float(np.abs(np.asarray(a)).max()))


def test_batchnorm_follows_torch_batchnorm2d_over_train_steps(rng):
  """Several train steps (a different random batch each, mean and scale shifting), then
  eval: outputs and running statistics equal `torch.nn.BatchNorm2d`'s (momentum 0.1,
  eps 1e-5; the running variance unbiased) within 1e-5. Flax's `nn.BatchNorm` (the
  biased running variance) on the same batches evaluates > 1e-3 away."""
  torch = pytest.importorskip("torch")
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from bitune_jax.models import layers  # pylint: disable=g-import-not-at-top
  channels = 5
  gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
  beta = rng.normal(0, 0.5, channels).astype(np.float32)
  params = {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)}
  stats = {"mean": jnp.zeros(channels), "var": jnp.ones(channels)}
  flax_stats = dict(stats)
  reference = torch.nn.BatchNorm2d(channels, momentum=0.1, eps=1e-5).double()
  with torch.no_grad():
    reference.weight.copy_(torch.from_numpy(gamma.astype(np.float64)))
    reference.bias.copy_(torch.from_numpy(beta.astype(np.float64)))

  def torch_apply(x):
    out = reference(torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2))
    return out.permute(0, 2, 3, 1).detach().numpy()

  def train(module):
    return jax.jit(lambda p, s, x: module.apply({"params": p, "batch_stats": s}, x,
                                                mutable=["batch_stats"]))
  ours = train(layers.BatchNorm(use_running_average=False))
  flax_train = train(nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5))
  for step in range(6):
    shape = (int(rng.integers(2, 5)), 3, 3, channels)  # n = 18..36 values per channel
    x = (rng.normal(rng.normal(0, 2, channels), rng.uniform(0.2, 3, channels), shape)
         .astype(np.float32))
    y, updates = ours(params, stats, x)
    stats = updates["batch_stats"]
    flax_stats = flax_train(params, flax_stats, x)[1]["batch_stats"]
    reference.train()
    np.testing.assert_allclose(np.asarray(y), torch_apply(x), atol=1e-5, rtol=0,
                               err_msg=f"train step {step}")
    np.testing.assert_allclose(stats["mean"], reference.running_mean.numpy(), atol=1e-5,
                               rtol=0, err_msg=f"running mean, step {step}")
    np.testing.assert_allclose(stats["var"], reference.running_var.numpy(), atol=1e-5,
                               rtol=1e-5, err_msg=f"running var, step {step}")
  x = rng.normal(0, 2, (3, 3, 3, channels)).astype(np.float32)
  reference.eval()
  expected = torch_apply(x)
  evaluated = layers.BatchNorm(use_running_average=True).apply(
      {"params": params, "batch_stats": stats}, x)
  np.testing.assert_allclose(np.asarray(evaluated), expected, atol=1e-5, rtol=0)
  biased = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(
      {"params": params, "batch_stats": flax_stats}, x)
  assert np.abs(np.asarray(biased) - expected).max() > 1e-3


@pytest.mark.parametrize("init", models.HEAD_INITS)
def test_heads_start_as_the_reference_heads(init):
  """Classifier and projector weights and biases: PyTorch's nn.Linear default (uniform
  within 1/sqrt(fan_in): bound reached, std bound/sqrt(3)), N(0, 0.01) and zero bias,
  or lecun-normal (std 1/sqrt(fan_in)) and zero bias; within 5 standard errors."""
  fan_in, classes = 512, 200
  features = jnp.zeros((2, fan_in))
  params = models.Classifier(classes, head_init=init).init(jax.random.PRNGKey(7), features)
  kernel = np.asarray(params["params"]["dense"]["kernel"], np.float64).ravel()
  bias = np.asarray(params["params"]["dense"]["bias"], np.float64)
  bound = 1 / np.sqrt(fan_in)
  std = {"torch": bound / np.sqrt(3), "normal_0.01": 0.01, "lecun": bound}[init]
  n = kernel.size
  assert abs(kernel.std() - std) < 5 * std / np.sqrt(2 * n), (kernel.std(), std)
  assert abs(kernel.mean()) < 5 * std / np.sqrt(n)
  if init == "torch":
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound
    assert np.abs(bias).max() <= bound and bias.std() > 0.3 * bound
  else:
    assert np.all(bias == 0)
  projector = models.Projector(dim=128, hidden_dim=256, head_init=init).init(
      jax.random.PRNGKey(8), features)["params"]
  for name, fan in (("hidden", fan_in), ("out", 256)):
    k = np.asarray(projector[name]["kernel"], np.float64)
    expected = {"torch": 1 / np.sqrt(3 * fan), "normal_0.01": 0.01,
                "lecun": 1 / np.sqrt(fan)}[init]
    assert abs(k.std() - expected) < 5 * expected / np.sqrt(2 * k.size), (name, k.std())
  with pytest.raises(ValueError, match="head init must be one of"):
    models.Classifier(3, head_init="xavier").init(jax.random.PRNGKey(0), features)


@pytest.mark.parametrize("method", ["finetune", "bituning", "cotuning", "delta", "l2sp",
                                    "bss", "center_loss", "gpt_star", "unsup_finetune"])
def test_each_method_starts_its_classifier_as_its_reference(method):
  """Bi-tuning's classifier N(0, 0.01) with a zero bias, every other method's PyTorch's
  nn.Linear default; `head_init` overrides it."""
  import importlib  # pylint: disable=g-import-not-at-top
  from bitune_jax import methods  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"bitune_jax.configs.{method}").get_config(
      "cub,resnet_small,25")
  for override, expected in (("", "normal_0.01" if method == "bituning" else "torch"),
                             ("lecun", "lecun")):
    config.head_init = override
    model = methods.get(method).build_model(config, 200)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = np.asarray(params["head"]["dense"]["kernel"])  # [64, 200]
    std = {"torch": 1 / np.sqrt(3 * 64), "normal_0.01": 0.01, "lecun": 1 / 8}[expected]
    assert abs(kernel.std() - std) < 5 * std / np.sqrt(2 * kernel.size), (method, override)
    bias = np.asarray(params["head"]["dense"]["bias"])
    assert (np.all(bias == 0)) == (expected != "torch"), (method, override)
