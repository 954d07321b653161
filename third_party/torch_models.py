"""PyTorch reference ResNets and DenseNet-121, written for this project's parity tests.

torchvision cannot be installed here, so these modules reproduce torchvision's
`resnet18/34/50/101/152` (v1.5: the stride sits on the 3x3 conv of a bottleneck) and
`densenet121` exactly in structure, computation and `state_dict()` key names, order and
shapes. The checkpoint converter is tested on random "torchvision-like" weights made with
`randomize_`, and on MoCo v1/v2 checkpoints made with `moco_v1_state_dict` /
`moco_v2_state_dict`. The library never imports this file.

Besides `forward`, every model has `forward_features(x)` (pooled features `[B, F]`) and
`forward_stages(x)` (an ordered dict of intermediate NCHW outputs) for per-stage parity.
"""

import collections
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ResNet", "BasicBlock", "Bottleneck", "DenseNet", "resnet18", "resnet34", "resnet50",
    "resnet101", "resnet152", "densenet121", "features", "stage_outputs", "randomize_",
    "moco_encoder", "moco_v1_state_dict", "moco_v2_state_dict",
]


def _conv(cin, cout, kernel, stride=1):
  """Bias-free square conv with padding kernel // 2 (torchvision's conv1x1/conv3x3/stem)."""
  return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


# ----------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
  """Two 3x3 convs (the first with the stride) plus the shortcut; expansion 1."""
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = _conv(inplanes, planes, 3, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = _conv(planes, planes, 3)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample
    self.stride = stride

  def residual_conv(self):
    """The last conv of the residual branch."""
    return self.conv2

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (with the stride: ResNet v1.5), 1x1 expand; expansion 4."""
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = _conv(inplanes, planes, 1)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = _conv(planes, planes * self.expansion, 1)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample
    self.stride = stride

  def residual_conv(self):
    """The last conv of the residual branch."""
    return self.conv3

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class ResNet(nn.Module):
  """torchvision's ResNet: stem, layer1..layer4, global average pool, `fc`."""

  def __init__(self, block, layers, num_classes=1000, arch="resnet", width_mult=1):
    super().__init__()
    self.arch = arch
    w = width_mult  # SimCLR v1's wider ResNets: every width (the stem's too) times w
    self.inplanes = 64 * w
    self.conv1 = _conv(3, 64 * w, 7, stride=2)
    self.bn1 = nn.BatchNorm2d(64 * w)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, 64 * w, layers[0])
    self.layer2 = self._make_layer(block, 128 * w, layers[1], stride=2)
    self.layer3 = self._make_layer(block, 256 * w, layers[2], stride=2)
    self.layer4 = self._make_layer(block, 512 * w, layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion * w, num_classes)
    self.num_features = 512 * block.expansion * w
    for m in self.modules():  # torchvision's initialisation
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(_conv(self.inplanes, planes * block.expansion, 1, stride),
                                 nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward_stages(self, x):
    """Ordered dict of NCHW outputs: 'stem' (after maxpool), 'layer1'..'layer4'."""
    out = collections.OrderedDict()
    x = out["stem"] = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for name in ("layer1", "layer2", "layer3", "layer4"):
      x = out[name] = getattr(self, name)(x)
    return out

  def forward_features(self, x):
    """Globally average-pooled layer4 output, [B, 512 * expansion]."""
    return torch.flatten(self.avgpool(self.forward_stages(x)["layer4"]), 1)

  def forward(self, x):
    return self.fc(self.forward_features(x))


def resnet18(num_classes=1000):
  return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, arch="resnet18")


def resnet34(num_classes=1000):
  return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, arch="resnet34")


def resnet50(num_classes=1000):
  return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, arch="resnet50")


def resnet101(num_classes=1000):
  return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, arch="resnet101")


def resnet152(num_classes=1000):
  return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, arch="resnet152")


def resnet50x2(num_classes=1000):
  """SimCLR v1 ResNet-50 (2x), as its PyTorch conversion defines it (`width_mult`)."""
  return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, arch="resnet50x2", width_mult=2)


def resnet50x4(num_classes=1000):
  return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, arch="resnet50x4", width_mult=4)


# --------------------------------------------------------------------------- DenseNet


class _DenseLayer(nn.Module):
  """BN-ReLU-conv1x1 (to bn_size * growth) - BN-ReLU-conv3x3 (to growth) on the concat."""

  def __init__(self, num_input_features, growth_rate, bn_size):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(num_input_features)
    self.relu1 = nn.ReLU(inplace=True)
    self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
    self.relu2 = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

  def forward(self, inputs):
    """inputs: list of the block input and all earlier layers' outputs; returns new ones."""
    x = self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))
    return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.ModuleDict):
  """`denselayer1..N`; the output is the input concatenated with every layer's output."""

  def __init__(self, num_layers, num_input_features, growth_rate, bn_size):
    super().__init__()
    for i in range(num_layers):
      layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
      self.add_module(f"denselayer{i + 1}", layer)

  def forward(self, x):
    feats = [x]
    for layer in self.values():
      feats.append(layer(feats))
    return torch.cat(feats, 1)


class _Transition(nn.Sequential):
  """norm, relu, conv (1x1, no bias), pool (2x2 average, stride 2)."""

  def __init__(self, num_input_features, num_output_features):
    super().__init__(collections.OrderedDict([
        ("norm", nn.BatchNorm2d(num_input_features)),
        ("relu", nn.ReLU(inplace=True)),
        ("conv", nn.Conv2d(num_input_features, num_output_features, 1, bias=False)),
        ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
    ]))


class DenseNet(nn.Module):
  """torchvision's DenseNet-BC: `features` (conv0 ... norm5) then `classifier`."""

  def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
               bn_size=4, num_classes=1000, arch="densenet"):
    super().__init__()
    self.arch = arch
    self.features = nn.Sequential(collections.OrderedDict([
        ("conv0", _conv(3, num_init_features, 7, stride=2)),
        ("norm0", nn.BatchNorm2d(num_init_features)),
        ("relu0", nn.ReLU(inplace=True)),
        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ]))
    c = num_init_features
    for i, num_layers in enumerate(block_config):
      self.features.add_module(f"denseblock{i + 1}",
                               _DenseBlock(num_layers, c, growth_rate, bn_size))
      c += num_layers * growth_rate
      if i != len(block_config) - 1:
        self.features.add_module(f"transition{i + 1}", _Transition(c, c // 2))
        c //= 2
    self.features.add_module("norm5", nn.BatchNorm2d(c))
    self.classifier = nn.Linear(c, num_classes)
    self.num_features = c
    for m in self.modules():  # torchvision's initialisation
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight)
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
      elif isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)

  def forward_stages(self, x):
    """Ordered dict of NCHW outputs: 'stem' (after pool0), each denseblockN and
    transitionN, and 'norm5' (before the final ReLU)."""
    out = collections.OrderedDict()
    for name, module in self.features.named_children():
      x = module(x)
      if name == "pool0":
        out["stem"] = x
      elif name.startswith(("denseblock", "transition", "norm5")):
        out[name] = x
    return out

  def forward_features(self, x):
    """features -> ReLU -> global average pool, [B, 1024] for DenseNet-121."""
    x = F.relu(self.features(x))
    return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)

  def forward(self, x):
    return self.classifier(self.forward_features(x))


def densenet121(num_classes=1000):
  return DenseNet(32, (6, 12, 24, 16), 64, 4, num_classes, arch="densenet121")


def features(model, x):
  """Pooled features [B, F] (F = 512, 2048 or 1024) of any model here."""
  return model.forward_features(x)


def stage_outputs(model, x):
  """Intermediate NCHW outputs of any model here (see its `forward_stages`)."""
  return model.forward_stages(x)


# ------------------------------------------------------------------- random weights


@torch.no_grad()
def randomize_(model, generator):
  """Overwrites every weight and BatchNorm buffer of `model` in place; returns it.

  Convs: He/kaiming normal (std sqrt(2 / fan_in)). Linears: normal, std 1 / sqrt(fan_in);
  biases normal * 0.1. BatchNorm: weight U(0.5, 1.5), bias N(0, 0.1^2), running_mean
  N(0, 0.1^2), running_var U(0.5, 1.5), num_batches_tracked a random int. In a ResNet the
  last conv of each residual branch is further scaled by 1 / sqrt(number of blocks), so
  that eval-mode activations keep an O(1)-O(10) scale (rms about 4 after ResNet-18's
  layer4, 9 after ResNet-152's) instead of growing with every block (to ~1e11 at the end
  of ResNet-152 without the scaling: eval-mode BatchNorm does not renormalise). Deterministic
  given `generator` (a CPU `torch.Generator`): values are drawn in `model.modules()` order.
  """
  def normal(t, std):
    t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * std)

  def uniform(t, lo, hi):
    t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=generator, dtype=t.dtype))

  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      normal(m.weight, math.sqrt(2.0 / m.weight[0].numel()))
      if m.bias is not None:
        normal(m.bias, 0.1)
    elif isinstance(m, nn.Linear):
      normal(m.weight, 1.0 / math.sqrt(m.in_features))
      if m.bias is not None:
        normal(m.bias, 0.1)
    elif isinstance(m, nn.BatchNorm2d):
      uniform(m.weight, 0.5, 1.5)
      normal(m.bias, 0.1)
      normal(m.running_mean, 0.1)
      uniform(m.running_var, 0.5, 1.5)
      m.num_batches_tracked.fill_(int(torch.randint(1, 10**6, (), generator=generator)))
  blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
  for block in blocks:
    block.residual_conv().weight.mul_(1.0 / math.sqrt(len(blocks)))
  return model


# ------------------------------------------------------------------------------ MoCo


def moco_encoder(arch="resnet50", mlp=True, dim=128):
  """MoCo's query encoder: a ResNet built with num_classes=dim whose `fc` is, for MoCo v2
  (mlp=True), replaced by Sequential(Linear(F, F), ReLU, Linear(F, dim)); for MoCo v1 it
  stays Linear(F, dim). `forward` gives the projector output before L2 normalisation."""
  model = globals()[arch](num_classes=dim)
  if mlp:
    f = model.fc.in_features
    model.fc = nn.Sequential(nn.Linear(f, f), nn.ReLU(), model.fc)
  return model


def _moco_checkpoint(encoder_q, mlp, with_module_prefix, generator, queue_size, key_noise,
                     epoch):
  """The dict `torch.save`d by MoCo's main_moco.py around a (DDP-wrapped) MoCo model."""
  fc = encoder_q.fc
  is_mlp = (isinstance(fc, nn.Sequential) and len(fc) == 3 and isinstance(fc[0], nn.Linear)
            and isinstance(fc[1], nn.ReLU) and isinstance(fc[2], nn.Linear))
  if is_mlp != mlp:
    raise ValueError(f"encoder_q.fc is {fc}; build the encoder with moco_encoder(mlp={mlp})")
  if generator is None:
    generator = torch.Generator().manual_seed(0)
  dim = (fc[2] if mlp else fc).out_features
  q_sd = encoder_q.state_dict()
  k_sd = collections.OrderedDict()
  for k, v in q_sd.items():  # the key encoder: a slightly different (EMA) copy
    if v.is_floating_point():
      v = v * (1 + key_noise * torch.randn(v.shape, generator=generator, dtype=v.dtype))
    k_sd[k] = v.clone()
  queue = F.normalize(torch.randn(dim, queue_size, generator=generator), dim=0)
  ptr = torch.randint(0, max(1, queue_size // 256), (1,), generator=generator) * 256
  prefix = "module." if with_module_prefix else ""
  # nn.Module.state_dict order: the MoCo module's own buffers, then its children.
  sd = collections.OrderedDict([(prefix + "queue", queue), (prefix + "queue_ptr", ptr)])
  sd.update((f"{prefix}encoder_q.{k}", v.clone()) for k, v in q_sd.items())
  sd.update((f"{prefix}encoder_k.{k}", v) for k, v in k_sd.items())
  n_params = 2 * len(list(encoder_q.parameters()))
  optimizer = {"state": {}, "param_groups": [{
      "lr": 0.0, "momentum": 0.9, "dampening": 0, "weight_decay": 1e-4, "nesterov": False,
      "maximize": False, "foreach": None, "differentiable": False, "fused": None,
      "params": list(range(n_params))}]}
  return {"epoch": epoch, "arch": getattr(encoder_q, "arch", "resnet50"), "state_dict": sd,
          "optimizer": optimizer}


def moco_v2_state_dict(model, with_module_prefix=True, *, generator=None, queue_size=4096,
                       key_noise=0.01, epoch=200):
  """MoCo v2 checkpoint `{"epoch", "arch", "state_dict", "optimizer"}` for the query
  encoder `model` (from `moco_encoder(arch, mlp=True)`, e.g. randomised): state_dict holds
  `[module.]queue [128, queue_size]`, `[module.]queue_ptr [1]`, `[module.]encoder_q.*` (the
  exact values of `model`, MLP head at `fc.0` / `fc.2`) and `[module.]encoder_k.*` (those
  values times 1 + key_noise * N(0, 1)). The real queue has 65536 slots; 4096 keeps test
  files small. The optimizer entry is an SGD state dict without momentum buffers."""
  return _moco_checkpoint(model, True, with_module_prefix, generator, queue_size, key_noise,
                          epoch)


def moco_v1_state_dict(model, with_module_prefix=True, *, generator=None, queue_size=4096,
                       key_noise=0.01, epoch=200):
  """As `moco_v2_state_dict`, for MoCo v1: `model` from `moco_encoder(arch, mlp=False)`,
  whose head is a plain `fc` Linear(F, 128)."""
  return _moco_checkpoint(model, False, with_module_prefix, generator, queue_size, key_noise,
                          epoch)
