"""The PyTorch reference ResNets / DenseNet-121 in third_party/torch_models.py.

They stand in for torchvision (not installable here) in the converter parity tests, so
their state dicts are checked against key lists written here from torchvision's layout,
their parameter counts against torchvision's published ones, and their forward passes
against a functional re-implementation that reads only the state dict.
"""

import io
import math

import pytest
import torch
import torch.nn.functional as F

import torch_models as tm

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "densenet121"]
# torchvision's published parameter counts.
PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
          "resnet101": 44_549_160, "resnet152": 60_192_808, "densenet121": 7_978_856}
# state_dict entries, num_batches_tracked included: stem 1 conv + 1 BN (5 entries each),
# 12 per basic block, 18 per bottleneck, 6 per downsample, 2 for fc. DenseNet-121:
# 6 (stem) + 58 layers * 12 + 3 transitions * 6 + 5 (norm5) + 2 (classifier) = 727.
ENTRIES = {"resnet18": 6 + 8 * 12 + 3 * 6 + 2, "resnet34": 6 + 16 * 12 + 3 * 6 + 2,
           "resnet50": 6 + 16 * 18 + 4 * 6 + 2, "resnet101": 6 + 33 * 18 + 4 * 6 + 2,
           "resnet152": 6 + 50 * 18 + 4 * 6 + 2, "densenet121": 727}
FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
            "resnet152": 2048, "densenet121": 1024}


def _meta(arch, **kw):
  with torch.device("meta"):  # no memory, no init cost: enough for keys and shapes
    return getattr(tm, arch)(**kw)


def _random(arch, seed=0, **kw):
  return tm.randomize_(getattr(tm, arch)(**kw), torch.Generator().manual_seed(seed)).eval()


def _bn(prefix, c):
  return [(f"{prefix}.{n}", (c,)) for n in ("weight", "bias", "running_mean", "running_var")
          ] + [(f"{prefix}.num_batches_tracked", ())]


def _expected_resnet(layers, bottleneck, num_classes=1000):
  """torchvision's ResNet state dict, in order: [(key, shape)]."""
  keys = [("conv1.weight", (64, 3, 7, 7))] + _bn("bn1", 64)
  cin = 64
  for i, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512))):
    cout = width * (4 if bottleneck else 1)
    for j in range(blocks):
      p = f"layer{i + 1}.{j}"
      if bottleneck:
        keys += [(f"{p}.conv1.weight", (width, cin, 1, 1))] + _bn(f"{p}.bn1", width)
        keys += [(f"{p}.conv2.weight", (width, width, 3, 3))] + _bn(f"{p}.bn2", width)
        keys += [(f"{p}.conv3.weight", (cout, width, 1, 1))] + _bn(f"{p}.bn3", cout)
      else:
        keys += [(f"{p}.conv1.weight", (width, cin, 3, 3))] + _bn(f"{p}.bn1", width)
        keys += [(f"{p}.conv2.weight", (width, width, 3, 3))] + _bn(f"{p}.bn2", width)
      if j == 0 and (i > 0 or cin != cout):
        keys += [(f"{p}.downsample.0.weight", (cout, cin, 1, 1))]
        keys += _bn(f"{p}.downsample.1", cout)
      cin = cout
  return keys + [("fc.weight", (num_classes, cin)), ("fc.bias", (num_classes,))]


def _expected_densenet121(num_classes=1000):
  """torchvision's DenseNet-121 state dict, in order: [(key, shape)]."""
  keys = [("features.conv0.weight", (64, 3, 7, 7))] + _bn("features.norm0", 64)
  c = 64
  for b, n in enumerate((6, 12, 24, 16), start=1):
    for i in range(1, n + 1):
      p = f"features.denseblock{b}.denselayer{i}"
      keys += _bn(f"{p}.norm1", c) + [(f"{p}.conv1.weight", (128, c, 1, 1))]
      keys += _bn(f"{p}.norm2", 128) + [(f"{p}.conv2.weight", (32, 128, 3, 3))]
      c += 32
    if b < 4:
      keys += _bn(f"features.transition{b}.norm", c)
      keys += [(f"features.transition{b}.conv.weight", (c // 2, c, 1, 1))]
      c //= 2
  keys += _bn("features.norm5", c)
  return keys + [("classifier.weight", (num_classes, c)), ("classifier.bias", (num_classes,))]


EXPECTED = {"resnet18": lambda: _expected_resnet([2, 2, 2, 2], False),
            "resnet50": lambda: _expected_resnet([3, 4, 6, 3], True),
            "densenet121": _expected_densenet121}
SPOT_CHECKS = {  # written out by hand
    "resnet18": {"layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer4.1.conv2.weight":
                 (512, 512, 3, 3), "layer3.0.conv1.weight": (256, 128, 3, 3),
                 "fc.weight": (1000, 512)},
    "resnet50": {"layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer3.5.conv3.weight":
                 (1024, 256, 1, 1), "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
                 "layer4.2.bn3.running_var": (2048,), "layer2.0.conv1.weight":
                 (128, 256, 1, 1), "fc.weight": (1000, 2048)},
    "densenet121": {"features.denseblock1.denselayer1.norm1.weight": (64,),
                    "features.transition1.conv.weight": (128, 256, 1, 1),
                    "features.transition3.conv.weight": (512, 1024, 1, 1),
                    "features.denseblock3.denselayer24.conv2.weight": (32, 128, 3, 3),
                    "features.denseblock4.denselayer16.conv1.weight": (128, 992, 1, 1),
                    "features.norm5.running_var": (1024,), "classifier.weight": (1000, 1024)},
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_state_dict_keys_order_and_shapes(arch):
  sd = _meta(arch).state_dict()
  assert [(k, tuple(v.shape)) for k, v in sd.items()] == EXPECTED[arch]()
  for k, shape in SPOT_CHECKS[arch].items():
    assert tuple(sd[k].shape) == shape, k
  assert not any("layer1.0.downsample" in k for k in sd) or arch == "resnet50"
  assert all(v.dtype == torch.long for k, v in sd.items() if k.endswith("batches_tracked"))


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_and_entry_counts(arch):
  model = _meta(arch)
  assert sum(p.numel() for p in model.parameters()) == PARAMS[arch]
  assert len(model.state_dict()) == ENTRIES[arch]
  assert ENTRIES["resnet18"] == 122 and ENTRIES["resnet50"] == 320


def test_v15_stride_on_the_3x3_conv():
  model = _meta("resnet50")
  block = model.layer2[0]
  assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
  assert block.downsample[0].stride == (2, 2) and block.downsample[0].bias is None
  assert model.conv1.padding == (3, 3) and model.maxpool.padding == 1


def _bn_eval(x, sd, p):
  return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                      sd[p + ".bias"], training=False, eps=1e-5)


def _functional_resnet(sd, x, layers, bottleneck):
  """Eval-mode ResNet v1.5 from the state dict alone: stages and logits."""
  conv = lambda x, k, s=1: F.conv2d(x, sd[k + ".weight"], stride=s,
                                    padding=sd[k + ".weight"].shape[-1] // 2)
  x = F.relu(_bn_eval(conv(x, "conv1", 2), sd, "bn1"))
  stages = [F.max_pool2d(x, 3, 2, 1)]
  x = stages[0]
  for i, n in enumerate(layers):
    for j in range(n):
      p, s = f"layer{i + 1}.{j}", (2 if i > 0 and j == 0 else 1)
      convs = [(1, 1), (2, s), (3, 1)] if bottleneck else [(1, s), (2, 1)]
      out = x
      for c, stride in convs:
        out = _bn_eval(conv(out, f"{p}.conv{c}", stride), sd, f"{p}.bn{c}")
        out = F.relu(out) if c < len(convs) else out
      short = x
      if f"{p}.downsample.0.weight" in sd:
        short = _bn_eval(conv(x, f"{p}.downsample.0", s), sd, f"{p}.downsample.1")
      x = F.relu(out + short)
    stages.append(x)
  return stages, F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def _functional_densenet121(sd, x):
  """Eval-mode DenseNet-121 from the state dict alone: logits."""
  bn_relu = lambda x, p: F.relu(_bn_eval(x, sd, p))
  x = F.conv2d(x, sd["features.conv0.weight"], stride=2, padding=3)
  x = F.max_pool2d(bn_relu(x, "features.norm0"), 3, 2, 1)
  for b, n in enumerate((6, 12, 24, 16), start=1):
    for i in range(1, n + 1):
      p = f"features.denseblock{b}.denselayer{i}"
      y = F.conv2d(bn_relu(x, p + ".norm1"), sd[p + ".conv1.weight"])
      x = torch.cat([x, F.conv2d(bn_relu(y, p + ".norm2"), sd[p + ".conv2.weight"],
                                 padding=1)], 1)
    if b < 4:
      p = f"features.transition{b}"
      x = F.avg_pool2d(F.conv2d(bn_relu(x, p + ".norm"), sd[p + ".conv.weight"]), 2, 2)
  x = bn_relu(x, "features.norm5").mean((2, 3))
  return F.linear(x, sd["classifier.weight"], sd["classifier.bias"])


@pytest.mark.parametrize("arch,layers,bottleneck",
                         [("resnet18", [2, 2, 2, 2], False), ("resnet50", [3, 4, 6, 3], True)])
def test_resnet_forward_matches_functional_reference(arch, layers, bottleneck):
  model = _random(arch, num_classes=10)
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    stages = tm.stage_outputs(model, x)
    ref_stages, ref_logits = _functional_resnet(model.state_dict(), x, layers, bottleneck)
    logits, feats = model(x), tm.features(model, x)
  e = 4 if bottleneck else 1
  shapes = [(2, 64, 16, 16), (2, 64 * e, 16, 16), (2, 128 * e, 8, 8), (2, 256 * e, 4, 4),
            (2, 512 * e, 2, 2)]
  assert list(stages) == ["stem", "layer1", "layer2", "layer3", "layer4"]
  for got, ref, shape in zip(stages.values(), ref_stages, shapes):
    assert got.shape == shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
  assert feats.shape == (2, FEATURES[arch]) and logits.shape == (2, 10)
  torch.testing.assert_close(feats, stages["layer4"].mean((2, 3)))
  torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_densenet_forward_matches_functional_reference():
  model = _random("densenet121", num_classes=10)
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    stages, feats, logits = model.forward_stages(x), tm.features(model, x), model(x)
    ref = _functional_densenet121(model.state_dict(), x)
  shapes = {"stem": (64, 16), "denseblock1": (256, 16), "transition1": (128, 8),
            "denseblock2": (512, 8), "transition2": (256, 4), "denseblock3": (1024, 4),
            "transition3": (512, 2), "denseblock4": (1024, 2), "norm5": (1024, 2)}
  assert {k: tuple(v.shape) for k, v in stages.items()} == {
      k: (2, c, s, s) for k, (c, s) in shapes.items()}
  assert feats.shape == (2, 1024) and logits.shape == (2, 10)
  torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet34", "resnet101", "resnet152"])
def test_output_shapes(arch):
  model = getattr(tm, arch)(num_classes=7).eval()
  with torch.no_grad():
    out, feats = model(torch.zeros(1, 3, 64, 64)), tm.features(model, torch.zeros(1, 3, 64, 64))
  assert out.shape == (1, 7) and feats.shape == (1, FEATURES[arch])


def test_randomize_is_deterministic_and_in_range():
  a, b, c = _random("resnet18", 3), _random("resnet18", 3), _random("resnet18", 4)
  for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(),
                             c.state_dict().values()):
    assert torch.equal(va, vb), k
    assert not torch.equal(va, vc), k
  sd = a.state_dict()
  for k, v in sd.items():
    if k.endswith("running_var") or (k.endswith(".weight") and v.ndim == 1):
      assert 0.5 <= v.min() and v.max() <= 1.5, k
    elif k.endswith("num_batches_tracked"):
      assert v.ndim == 0 and v > 0, k
  assert 0.05 < sd["bn1.running_mean"].std() < 0.2
  w = sd["layer3.1.conv1.weight"]  # kaiming: std sqrt(2 / fan_in)
  assert abs(w.std().item() / math.sqrt(2 / (256 * 9)) - 1) < 0.05


def test_resnet152_activations_keep_their_scale():
  model = _random("resnet152")
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    stages, logits = model.forward_stages(x), model(x)
  assert torch.isfinite(logits).all()
  for name, y in stages.items():
    rms = y.pow(2).mean().sqrt().item()
    varying = (y - y.mean(0)).pow(2).mean().sqrt().item()  # the input-dependent part
    assert 1 < rms < 30 and 0.3 < varying, (name, rms, varying)


def _moco_keys(backbone_keys, mlp):
  head = ([("fc.0.weight", (2048, 2048)), ("fc.0.bias", (2048,)),
           ("fc.2.weight", (128, 2048)), ("fc.2.bias", (128,))] if mlp
          else [("fc.weight", (128, 2048)), ("fc.bias", (128,))])
  body = [(k, s) for k, s in backbone_keys if not k.startswith("fc.")] + head
  return ([("module.queue", (128, 4096)), ("module.queue_ptr", (1,))]
          + [(f"module.encoder_{e}.{k}", s) for e in "qk" for k, s in body])


@pytest.mark.parametrize("mlp", [True, False])
def test_moco_checkpoint_structure(mlp):
  encoder = tm.randomize_(tm.moco_encoder("resnet50", mlp=mlp),
                          torch.Generator().manual_seed(0)).eval()
  make = tm.moco_v2_state_dict if mlp else tm.moco_v1_state_dict
  ckpt = make(encoder)
  assert ckpt["epoch"] == 200 and ckpt["arch"] == "resnet50"
  assert set(ckpt) == {"epoch", "arch", "state_dict", "optimizer"}
  sd = ckpt["state_dict"]
  assert [(k, tuple(v.shape)) for k, v in sd.items()] == _moco_keys(
      _expected_resnet([3, 4, 6, 3], True), mlp)
  assert len(sd) == (646 if mlp else 642)
  torch.testing.assert_close(sd["module.queue"].norm(dim=0), torch.ones(4096))
  assert sd["module.queue_ptr"].dtype == torch.long
  for k, v in encoder.state_dict().items():
    assert torch.equal(sd["module.encoder_q." + k], v), k
  q, k = sd["module.encoder_q.layer1.0.conv1.weight"], sd["module.encoder_k.layer1.0.conv1.weight"]
  assert not torch.equal(q, k) and torch.allclose(q, k, rtol=0.1, atol=0)
  with torch.no_grad():
    assert encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 128)
  assert len(ckpt["optimizer"]["param_groups"][0]["params"]) == 2 * (161 + (2 if mlp else 0))
  unprefixed = make(encoder, with_module_prefix=False)["state_dict"]
  assert list(unprefixed) == [k[len("module."):] for k in sd]
  with pytest.raises(ValueError, match=r"(?s)encoder_q.fc is .*; build the encoder with moco_encoder"):
    (tm.moco_v1_state_dict if mlp else tm.moco_v2_state_dict)(encoder)


def test_moco_checkpoint_round_trips_through_torch_save():
  encoder = tm.moco_encoder("resnet18")
  ckpt = tm.moco_v2_state_dict(encoder, queue_size=256)
  buf = io.BytesIO()
  torch.save(ckpt, buf)
  buf.seek(0)
  loaded = torch.load(buf, weights_only=True)
  assert loaded["state_dict"]["module.encoder_q.fc.0.weight"].shape == (512, 512)
  assert loaded["state_dict"]["module.queue"].shape == (128, 256)
  assert loaded["arch"] == "resnet18" and loaded["optimizer"] == ckpt["optimizer"]
