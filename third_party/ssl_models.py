"""PyTorch reference models of self-supervised ResNet-50 checkpoints, for converter tests.

Each model has the exact module layout (and so the `state_dict()` names) of its source
project, written for this project from those projects' model definitions, with the
torchvision ResNet of `torch_models` as the trunk:

* MoCo v3 (facebookresearch/moco-v3, `moco/builder.py`, MoCo_ResNet): `base_encoder` and
  `momentum_encoder` are torchvision ResNet-50s whose `fc` is the projector MLP
  Linear(2048, 4096, bias=False), BatchNorm1d(4096), ReLU, Linear(4096, 256, bias=False),
  BatchNorm1d(256, affine=False); `predictor` is Linear(256, 4096, bias=False),
  BatchNorm1d, ReLU, Linear(4096, 256, bias=False) (+ BatchNorm1d(affine=False) in the
  version without `last_bn`).
* SwAV and DeepCluster-v2 (facebookresearch/swav, `src/resnet50.py`): a ResNet-50 without
  `fc`, whose stem is ConstantPad2d(1) then a 7x7 conv with padding 2 (= torchvision's
  padding 3), `projection_head` Linear(2048, 2048), BatchNorm1d(2048), ReLU,
  Linear(2048, 128), and `prototypes`: Linear(128, 3000, bias=False) (SwAV) or
  MultiPrototypes, `prototypes.prototypes{i}` Linear(128, k_i, bias=False) (DC-v2).
* InsDisc (zhirongw/lemniscate.pytorch): a torchvision ResNet-50 whose `fc` is
  Linear(2048, 128) (the embedding, L2-normalised by a parameter-free module).

`forward` gives the projector output before any L2 normalisation; `forward_features` the
pooled backbone features. The library never imports this file.
"""

import collections
import math

import torch
from torch import nn

import torch_models

__all__ = ["MoCoV3ResNet50", "SwAVResNet50", "insdisc_resnet50", "randomize_",
           "moco_v3_checkpoint", "swav_state_dict", "insdisc_checkpoint"]


def _mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
  """MoCo v3's MLP: bias-free Linears, BatchNorm1d + ReLU between, an optional final
  BatchNorm1d without affine parameters."""
  modules = []
  for i in range(num_layers):
    fan_in = input_dim if i == 0 else mlp_dim
    fan_out = output_dim if i == num_layers - 1 else mlp_dim
    modules.append(nn.Linear(fan_in, fan_out, bias=False))
    if i < num_layers - 1:
      modules += [nn.BatchNorm1d(fan_out), nn.ReLU(inplace=True)]
    elif last_bn:
      modules.append(nn.BatchNorm1d(fan_out, affine=False))
  return nn.Sequential(*modules)


class MoCoV3ResNet50(nn.Module):
  """MoCo v3's ResNet model: `base_encoder`, `momentum_encoder`, `predictor`."""

  def __init__(self, dim=256, mlp_dim=4096, predictor_last_bn=False):
    super().__init__()
    self.base_encoder = torch_models.resnet50(num_classes=mlp_dim)
    self.momentum_encoder = torch_models.resnet50(num_classes=mlp_dim)
    features = self.base_encoder.fc.in_features
    del self.base_encoder.fc, self.momentum_encoder.fc
    self.base_encoder.fc = _mlp(2, features, mlp_dim, dim)
    self.momentum_encoder.fc = _mlp(2, features, mlp_dim, dim)
    self.predictor = _mlp(2, dim, mlp_dim, dim, last_bn=predictor_last_bn)

  def forward_features(self, x):
    return self.base_encoder.forward_features(x)

  def forward(self, x):
    return self.base_encoder(x)


class _MultiPrototypes(nn.Module):
  """SwAV's MultiPrototypes (DeepCluster-v2): one bias-free Linear per clustering."""

  def __init__(self, output_dim, nmb_prototypes):
    super().__init__()
    for i, k in enumerate(nmb_prototypes):
      self.add_module(f"prototypes{i}", nn.Linear(output_dim, k, bias=False))


class SwAVResNet50(nn.Module):
  """SwAV's `resnet50(normalize=True, hidden_mlp=2048, output_dim=128, nmb_prototypes)`;
  a list of prototype counts gives DeepCluster-v2's MultiPrototypes."""

  def __init__(self, output_dim=128, hidden_mlp=2048, nmb_prototypes=3000):
    super().__init__()
    trunk = torch_models.resnet50()
    self.padding = nn.ConstantPad2d(1, 0.0)
    self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=2, bias=False)
    self.bn1, self.relu, self.maxpool = trunk.bn1, trunk.relu, trunk.maxpool
    self.layer1, self.layer2 = trunk.layer1, trunk.layer2
    self.layer3, self.layer4 = trunk.layer3, trunk.layer4
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    width = trunk.num_features
    if hidden_mlp:
      self.projection_head = nn.Sequential(
          nn.Linear(width, hidden_mlp), nn.BatchNorm1d(hidden_mlp), nn.ReLU(inplace=True),
          nn.Linear(hidden_mlp, output_dim))
    else:
      self.projection_head = nn.Linear(width, output_dim)
    if isinstance(nmb_prototypes, (list, tuple)):
      self.prototypes = _MultiPrototypes(output_dim, nmb_prototypes)
    else:
      self.prototypes = nn.Linear(output_dim, nmb_prototypes, bias=False)

  def forward_features(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)

  def forward(self, x):
    return self.projection_head(self.forward_features(x))


def insdisc_resnet50(low_dim=128):
  """InsDisc's ResNet-50: torchvision's with `fc` = Linear(2048, low_dim)."""
  return torch_models.resnet50(num_classes=low_dim)


@torch.no_grad()
def randomize_(model, generator):
  """`torch_models.randomize_`, then BatchNorm1d as BatchNorm2d there: weight U(0.5, 1.5)
  and bias N(0, 0.1^2) when affine, running_mean N(0, 0.1^2), running_var U(0.5, 1.5),
  so that every projector statistic matters. Returns `model`."""
  torch_models.randomize_(model, generator)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm1d):
      if m.affine:
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=generator))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
      m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
      m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
      m.num_batches_tracked.fill_(int(torch.randint(1, 10**6, (), generator=generator)))
  return model


def _ddp(state_dict):
  """A (Distributed)DataParallel model's state_dict: every name under `module.`."""
  return collections.OrderedDict((f"module.{k}", v) for k, v in state_dict.items())


def _sgd_state(model):
  return {"state": {}, "param_groups": [{
      "lr": 0.0, "momentum": 0.9, "dampening": 0, "weight_decay": 1e-4, "nesterov": False,
      "params": list(range(len(list(model.parameters()))))}]}


@torch.no_grad()
def moco_v3_checkpoint(model, generator, key_noise=0.01, epoch=300):
  """What moco-v3's main_moco.py saves: {'epoch', 'arch', 'state_dict' (DDP names),
  'optimizer', 'scaler'}; the momentum encoder set to the base encoder's values times
  1 + key_noise * N(0, 1), so that it differs from what is converted."""
  for base, momentum in zip(model.base_encoder.state_dict().values(),
                            model.momentum_encoder.state_dict().values()):
    noise = 1.0
    if base.is_floating_point():
      noise = 1 + key_noise * torch.randn(base.shape, generator=generator)
    momentum.copy_(base * noise)
  scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
            "growth_interval": 2000, "_growth_tracker": 0}
  return {"epoch": epoch, "arch": "resnet50", "state_dict": _ddp(model.state_dict()),
          "optimizer": _sgd_state(model), "scaler": scaler}


def swav_state_dict(model):
  """The released SwAV / DeepCluster-v2 files: the DDP model's flat state_dict."""
  return _ddp(model.state_dict())


def insdisc_checkpoint(model, lemniscate, epoch=200):
  """What lemniscate.pytorch's main.py saves: {'epoch', 'arch', 'state_dict' (DataParallel
  names), 'lemniscate' (the memory-bank nn.Module itself), 'best_prec1', 'optimizer'}."""
  return {"epoch": epoch, "arch": "resnet50", "state_dict": _ddp(model.state_dict()),
          "lemniscate": lemniscate, "best_prec1": 0.5 * math.pi,
          "optimizer": _sgd_state(model)}
