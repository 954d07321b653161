"""The optimizer every method trains with, one learning-rate multiplier per parameter
group (`config.lr_mult.<group>`, the groups of `common.GROUPS`):

- "sgd": SGD with (nesterov) momentum and coupled weight decay, as `torch.optim.SGD`:
  the ResNet recipe of the papers' reference code;
- "adamw": AdamW (b1 0.9, b2 0.999, eps 1e-8) with decoupled weight decay on the weight
  matrices and kernels only (not biases, norms, LayerScale, the class token, registers
  or position embeddings, as timm, DeiT, MAE and BEiT exclude them), and on a ViT's
  backbone layer-wise learning-rate decay `lr_mult.layer_decay` = d: block i (0-based)
  of L at d^(L - i), the patch embedding, tokens and positions at d^(L + 1), the final
  norm (and CLIP's `proj`) at 1, as MAE's `param_groups_lrd`. The multiplier scales the
  whole update, AdamW's weight decay included (a per-group learning rate in PyTorch).

Schedules (`config.schedule`): "step" (x `decay_factor` at each fraction `decay_at` of
the steps) or "cosine" (to 0 at `total_steps`), the latter after a linear warmup from 0
over `warmup_fraction` of the steps (MAE's, in steps instead of epochs).
"""

import logging
import re

import jax
import jax.numpy as jnp
import optax

from bitune_jax import models
from bitune_jax.methods import common
from bitune_jax.models import vit

log = logging.getLogger("bitune_jax")

OPTIMIZERS = ("sgd", "adamw")
# Parameters AdamW does not decay, beside every vector (biases, norms, LayerScale).
_NO_DECAY = ("cls_token", "pos_embed", "reg_tokens")
_STEM = ("patch_embed", "cls_token", "pos_embed", "reg_tokens", "ln_pre")


def warmup_steps(config):
  return int(config.warmup_fraction * config.total_steps)


def learning_rate_schedule(config):
  """The base rate at each 0-based optimizer step (`config.lr` times the schedule)."""
  total = config.total_steps
  if config.schedule == "cosine":
    warmup = warmup_steps(config)
    if warmup:
      return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(total, 1))
    return optax.cosine_decay_schedule(config.lr, decay_steps=max(total, 1))
  if config.schedule == "step":
    boundaries = {int(f * total): config.decay_factor for f in config.decay_at
                  if 0 < int(f * total) < total}
    return optax.piecewise_constant_schedule(config.lr, boundaries)
  raise ValueError(f"schedule must be 'step' or 'cosine', got {config.schedule!r}")


def _names(path):
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def layer_multiplier(names, depth, decay):
  """The layer-wise decay factor of a ViT backbone parameter at `names` (its path)."""
  block = next((int(m[1]) for n in names if (m := re.fullmatch(r"blocks_(\d+)", n))), None)
  if block is not None:
    return decay ** (depth - block)
  if any(n in _STEM for n in names):
    return decay ** (depth + 1)
  return 1.0


def scale_by_layer(depth, decay):
  """Each update leaf of a ViT backbone times `layer_multiplier` of its path."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * jnp.asarray(layer_multiplier(_names(path), depth, decay),
                                        u.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(params):
  """True where AdamW decays: kernels and weight matrices, not `_NO_DECAY`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and not set(_names(path)) & set(_NO_DECAY), params)


def make_optimizer(config):
  """`config.optimizer` per parameter group (module docstring)."""
  base = learning_rate_schedule(config)
  decay = config.lr_mult.get("layer_decay", 1.0)  # absent: no decay

  def group_tx(group, mult):
    rate = lambda step: mult * base(step)  # noqa: E731
    if config.optimizer == "sgd":
      tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(rate, momentum=config.momentum, nesterov=config.nesterov))
    elif config.optimizer == "adamw":
      tx = optax.adamw(rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay,
                       mask=decay_mask)
    else:
      raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                       f"{config.optimizer!r}")
    if group == "backbone" and decay != 1.0:
      tx = optax.chain(tx, scale_by_layer(vit.VARIANTS[config.arch]["depth"], decay))
    return tx
  transforms = {g: group_tx(g, config.lr_mult.get(g, 1.0)) for g in common.GROUPS}
  label_fn = lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}  # noqa: E731
  return optax.multi_transform(transforms, label_fn)


def learning_rates(config, groups, step):
  """`{"lr/<group>": rate}`: each group's learning rate at 0-based optimizer step `step`
  (the update that makes train step `step + 1`; a ViT backbone's last block's)."""
  base = float(learning_rate_schedule(config)(step))
  return {f"lr/{g}": config.lr_mult.get(g, 1.0) * base for g in groups}


def log_learning_rates(config, params):
  for group in params:
    mult = config.lr_mult.get(group, 1.0)
    log.info("learning rate of %-11s %.3g (x%g of %.3g; %s, schedule %s)", group,
             mult * config.lr, mult, config.lr, config.optimizer, config.schedule)
  decay = config.lr_mult.get("layer_decay", 1.0)
  if decay != 1.0 and models.is_vit(config.arch):
    depth = vit.VARIANTS[config.arch]["depth"]
    log.info("layer-wise decay %g: the backbone's blocks at x%.3g (first) to x%g (last), "
             "its patch embedding at x%.3g", decay, decay ** depth, decay,
             decay ** (depth + 1))
