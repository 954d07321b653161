"""PyTorch transliteration of DELTA as TLlib computes it (the Bi-tuning and Co-Tuning
papers' DELTA rows), written for this project's parity tests from the definition:

  * the maps are the outputs of `layer<i>.<last>.conv3` (forward hooks on those convs:
    before bn3 and the residual add), of the network being trained (train mode) and of
    the frozen source network (eval mode);
  * penalty per map: `0.5 * sum_b sum_c C * W_c * ||FM_bc - FM*_bc||_2^2 / (H*W)` in
    NCHW, the norm over the H*W positions;
  * attention: a classifier in eval mode; for each map and channel j the conv's weight
    row j is set to 0 and the batch-mean cross-entropy is recomputed; the increases are
    averaged over the batches as a running mean of the per-batch values; then
    `softmax(zscore(D) / 5)` per map, zscore with the population standard deviation.

Structure follows the reference on purpose, not ours. The library never imports it.
"""

import numpy as np
import torch
import torch.nn.functional as F


def last_convs(model):
  """`{"layer<i>": the conv3 module of layer<i>'s last block}` of a torchvision ResNet."""
  return {name: getattr(model, name)[-1].conv3
          for name in ("layer1", "layer2", "layer3", "layer4")}


def hooked_maps(model, convs, x):
  """`(logits, {name: NCHW output of conv})` of one forward pass."""
  maps, handles = {}, []
  for name, conv in convs.items():
    handles.append(conv.register_forward_hook(
        lambda module, inputs, output, name=name: maps.__setitem__(name, output)))
  try:
    logits = model(x)
  finally:
    for h in handles:
      h.remove()
  return logits, maps


def penalty(target_maps, source_maps, attention):
  """TLlib's AttentionBehavioralRegularization, from its formula."""
  total = 0.0
  for name, w in attention.items():
    fm_t, fm_s = target_maps[name], source_maps[name].detach()
    b, c, h, wd = fm_s.shape
    distance = torch.norm((fm_t - fm_s).reshape(b, c, h * wd), 2, 2)  # [B, C]
    total = total + 0.5 * torch.sum(c * w[None, :] * distance ** 2 / (h * wd))
  return total


@torch.no_grad()
def loss_increases_by_zeroing(model, conv, batches, channels):
  """D[j] for the given channel indices, literally: zero conv.weight[j], recompute the
  batch-mean cross-entropy, restore; running mean over the batches."""
  out = np.zeros(len(channels))
  for i, (x, y) in enumerate(batches):
    loss_0 = F.cross_entropy(model(x), y).item()
    for n, j in enumerate(channels):
      saved = conv.weight[j].clone()
      conv.weight[j] = 0.0
      diff = F.cross_entropy(model(x), y).item() - loss_0
      conv.weight[j] = saved
      out[n] = (i * out[n] + diff) / (i + 1)
  return out


@torch.no_grad()
def loss_increases(model, convs, batches, chunk=256):
  """D of every channel of every map: the same quantity as
  `loss_increases_by_zeroing`, computed faster by zeroing channel j of the conv's
  output (what a zero weight row gives: the convs have no bias), `chunk` channels at
  once on replicas: the rest of the last block (torchvision's Bottleneck: bn3, add
  the identity, ReLU), the later stages, the pool and `fc` run on the replicas."""
  stages = ["layer1", "layer2", "layer3", "layer4"]
  result = {}
  for name, conv in convs.items():
    block = getattr(model, name)[-1]
    later = [getattr(model, n) for n in stages[stages.index(name) + 1:]]
    c = conv.out_channels
    d = np.zeros(c)
    for i, (x, y) in enumerate(batches):
      seen = {}
      handles = [block.register_forward_pre_hook(
                     lambda m, args: seen.__setitem__("input", args[0])),
                 conv.register_forward_hook(
                     lambda m, inputs, out: seen.__setitem__("conv", out))]
      try:
        loss_0 = F.cross_entropy(model(x), y).item()
      finally:
        for h in handles:
          h.remove()
      identity = seen["input"]
      if block.downsample is not None:
        identity = block.downsample(identity)
      b = x.shape[0]
      for start in range(0, c, chunk):
        idx = torch.arange(start, min(start + chunk, c))
        n = len(idx)
        mask = torch.ones(n, c, dtype=x.dtype)
        mask[torch.arange(n), idx] = 0.0
        mask = mask.repeat_interleave(b, 0)[:, :, None, None]  # [n*B, C, 1, 1]
        z = seen["conv"].repeat(n, 1, 1, 1) * mask  # replica r zeroes channel idx[r]
        z = torch.relu(block.bn3(z) + identity.repeat(n, 1, 1, 1))
        for stage in later:
          z = stage(z)
        logits = model.fc(torch.flatten(model.avgpool(z), 1))
        per_example = F.cross_entropy(logits, y.repeat(n), reduction="none")
        diff = per_example.reshape(n, b).mean(1).numpy() - loss_0
        d[start:start + n] = (i * d[start:start + n] + diff) / (i + 1)
    result[name] = d
  return result


def attention_from_increases(d, temperature=5.0):
  """`softmax(zscore(D) / temperature)`."""
  w = (d - np.mean(d)) / np.std(d)
  return F.softmax(torch.from_numpy(w).float() / temperature, dim=0).numpy()
