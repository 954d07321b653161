"""The optimiser and its schedules, against independent references:
`torch.optim.SGD` (nesterov, coupled weight decay, one param group per parameter
group), closed forms of the step and cosine schedules, the cosine schedule as the
learning rate a real fine-tuning step applies (the head bias's SGD updates recomputed
in float64), and the paper's queue size per sampling rate. (The BYOL cosine momentum
ramp of the key encoder is tested in real Bi-tuning steps in `test_bituning.py`.)"""

import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from bitune_jax import models, sharding
from bitune_jax.methods import common, optimizer
from bitune_jax.training import loop
import fakes  # noqa: E402  pylint: disable=g-import-not-at-top
import method_references  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import bituning as bituning_config  # noqa: E402  pylint: disable=g-import-not-at-top
import finetune as finetune_config  # noqa: E402  pylint: disable=g-import-not-at-top

SEED, CLASSES = method_references.SEED, method_references.CLASSES

# The reference's per-group learning-rate multipliers (DESIGN.md).
MULT = {"backbone": 0.1, "head": 1.0, "projector": 0.1}
SEEDS = (0, 1)


def _paper_config(**overrides):
  """The paper's optimiser settings (lr 0.01, SGD nesterov 0.9, weight decay 5e-4)."""
  config = bituning_config.get_config("cub,resnet50,25")
  for key, value in overrides.items():
    config[key] = value
  return config


def _tree(rng):
  """A small parameter tree with the three Bi-tuning groups (float32, like params)."""
  shapes = {"backbone": {"conv": {"kernel": (3, 3, 2, 4)}, "bn": {"scale": (4,)}},
            "head": {"dense": {"kernel": (4, 5), "bias": (5,)}},
            "projector": {"out": {"kernel": (4, 3), "bias": (3,)}}}
  return jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _step_lr(step, *, lr, total, decay_at=(0.6, 0.9), factor=0.1):
  """x factor once the step (0-based count of updates done) reaches int(f * T)."""
  return lr * factor ** sum(step >= int(f * total) for f in decay_at)


def _cosine_lr(step, *, lr, total):
  return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _torch_sgd(params, config):
  """Float64 torch parameters per group and `torch.optim.SGD` with one param group
  per parameter group (lr set each step)."""
  tensors = {g: [torch.tensor(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)]
             for g, tree in params.items()}
  groups = [dict(params=tensors[g], lr=MULT[g] * config.lr, name=g) for g in tensors]
  opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                        nesterov=config.nesterov, weight_decay=config.weight_decay)
  return tensors, opt


@pytest.mark.parametrize("seed", SEEDS)
def test_updates_equal_torch_sgd_across_the_step_decays(seed):
  """Every update over T = 10 steps (decays at steps 6 and 9): the first two updates
  of the paper's optimiser, then the steps around both boundaries."""
  total = 10
  config = _paper_config(total_steps=total)
  rng = np.random.default_rng(seed)
  params = _tree(rng)
  tx = optimizer.make_optimizer(config)
  opt_state = tx.init(params)
  tensors, opt = _torch_sgd(params, config)
  update = jax.jit(tx.update)
  for step in range(total + 1):
    grads = _tree(rng)
    for group in opt.param_groups:
      group["lr"] = MULT[group["name"]] * _step_lr(step, lr=config.lr, total=total)
      for p, g in zip(group["params"], jax.tree.leaves(grads[group["name"]])):
        p.grad = torch.tensor(np.asarray(g, np.float64))
    before = {g: [p.detach().clone() for p in ps] for g, ps in tensors.items()}
    opt.step()
    updates, opt_state = update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    for g in tensors:
      want = [(a - b).numpy() for a, b in zip(tensors[g], before[g])]
      got = jax.tree.leaves(updates[g])
      scale = max(np.abs(w).max() for w in want)
      for name, (w, u) in enumerate(zip(want, got)):
        np.testing.assert_allclose(
            u, w, rtol=1e-6, atol=1e-6 * scale,
            err_msg=f"seed {seed}, update {step}, group {g}, leaf {name}")


@pytest.mark.parametrize("total", [10, 97, 10_000])
def test_step_schedule_around_its_boundaries(total):
  config = _paper_config(total_steps=total)
  schedule = optimizer.learning_rate_schedule(config)
  boundaries = [int(0.6 * total), int(0.9 * total)]
  steps = sorted({0, total - 1, total} | {b + d for b in boundaries for d in (-1, 0, 1)})
  for step in steps:
    want = _step_lr(step, lr=0.01, total=total)
    assert float(schedule(step)) == pytest.approx(want, rel=1e-6), (total, step, want)
  # The decays really are at the boundaries: 0.01 -> 0.001 -> 0.0001.
  assert [float(schedule(b - 1)) / float(schedule(b)) for b in boundaries] == \
      pytest.approx([10.0, 10.0], rel=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_cosine_schedule_closed_form(seed):
  total = 1000
  config = _paper_config(total_steps=total, schedule="cosine")
  schedule = optimizer.learning_rate_schedule(config)
  rng = np.random.default_rng(seed)
  steps = [0, 1, total // 4, total // 2, total - 1, total, total + 7,
           *rng.integers(0, total, size=5).tolist()]
  for step in steps:
    want = _cosine_lr(step, lr=0.01, total=total)
    assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), (
        f"seed {seed}, step {step}")
  assert float(schedule(total // 2)) == pytest.approx(0.005, rel=1e-6)


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_learning_rate_applied_per_group_at_each_step(schedule):
  """With momentum 0 and weight decay 0 the update is `-mult_group * lr(step) * grad`:
  the rate the optimiser really applies, step by step across the decays."""
  total, seed = 20, 3
  config = _paper_config(total_steps=total, schedule=schedule, momentum=0.0,
                         weight_decay=0.0)
  lr = {"step": lambda s: _step_lr(s, lr=0.01, total=total),
        "cosine": lambda s: _cosine_lr(s, lr=0.01, total=total)}[schedule]
  rng = np.random.default_rng(seed)
  params = _tree(rng)
  tx = optimizer.make_optimizer(config)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(total):
    grads = _tree(rng)
    updates, opt_state = update(grads, opt_state, params)
    for g in MULT:
      for u, grad in zip(jax.tree.leaves(updates[g]), jax.tree.leaves(grads[g])):
        np.testing.assert_allclose(
            u, -MULT[g] * lr(step) * grad.astype(np.float64), rtol=1e-5,
            atol=1e-12, err_msg=f"seed {seed}, {schedule}, step {step}, group {g}")


def test_cosine_schedule_is_the_learning_rate_applied():
  """The head bias's SGD updates (weight decay, nesterov momentum) recomputed in
  float64 from the step's logits: the learning rate they imply is the cosine's."""
  config = method_references.run_config(finetune_config, schedule="cosine")
  mesh = sharding.make_mesh()
  run = loop.setup(config, mesh)
  state, trace = run.state, np.zeros(CLASSES)
  mu, wd, lr, total = config.momentum, config.weight_decay, config.lr, config.total_steps
  step_lr = [config.lr * (config.decay_factor if t >= int(0.7 * total) else 1.0)
             for t in range(total)]
  for t, batch in zip(range(4), fakes.view_batches(run)):
    before = jax.device_get(state)
    state, _ = run.train_step(state, sharding.global_batch(batch, mesh))
    after = np.asarray(state.params["head"]["dense"]["bias"], np.float64)
    out, _ = common.forward(run.model, before.params, before.batch_stats, batch["image"],
                            train=True)
    logits = np.asarray(out["logits"], np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    bias = np.asarray(before.params["head"]["dense"]["bias"], np.float64)
    grad = (probs - np.eye(CLASSES)[batch["label"]]).mean(0) + wd * bias
    trace = grad + mu * trace
    update = grad + mu * trace  # nesterov
    implied = float(np.dot(bias - after, update) / np.dot(update, update))
    cosine = lr * 0.5 * (1 + math.cos(math.pi * t / total))
    # Measured: implied within 2e-7 relative, bias within 3e-9 (float32 noise of the
    # logits); the step schedule's 0.05 vs the cosine's 0.0467 at t = 1 is 7%.
    assert implied == pytest.approx(cosine, rel=1e-4), (SEED, t, implied, cosine,
                                                        step_lr[t])
    np.testing.assert_allclose(after, bias - cosine * update, rtol=0, atol=1e-7)
  assert step_lr[1] != pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / total)), rel=1e-2)


# --------------------------------------------------------------------------- queue size
@pytest.mark.parametrize("rate, queue_size", [
    (15, 8), (25, 8), (30, 16), (50, 16), (75, 24), (100, 32),  # SAMPLING_RATES
    (12.5, 8), (25.5, 16), (50.5, 24), (99.9, 32)])
def test_queue_size_by_sampling_rate(rate, queue_size):
  """The paper's K = 8, 16, 24, 32 at 25, 50, 75, 100%; in between, the next
  multiple of 8."""
  config = bituning_config.get_config(f"cub,resnet50,{rate}")
  assert config.sampling_rate == rate
  assert config.bituning.queue_size == queue_size, (rate, config.bituning.queue_size)


# --------------------------------------------------------------------- the ViT recipe
def _warmup_cosine_lr(step, *, lr, total, warmup):
  """MAE's `adjust_learning_rate`, in steps: linear from 0, then half a cosine to 0."""
  if step < warmup:
    return lr * step / warmup
  return lr * 0.5 * (1.0 + math.cos(math.pi * (min(step, total) - warmup) / (total - warmup)))


def _mae_layer_scale(names, depth, decay):
  """MAE's `param_groups_lrd`: layer id 0 for the patch embedding, class token and
  positions, i + 1 for block i, depth + 1 for the rest; scale decay^(depth + 1 - id)."""
  top = names[0]
  if top in ("patch_embed", "cls_token", "pos_embed", "reg_tokens", "ln_pre"):
    layer = 0
  elif top.startswith("blocks_"):
    layer = int(top.split("_")[1]) + 1
  else:
    layer = depth + 1
  return decay ** (depth + 1 - layer)


def test_vit_recipe_config():
  config = bituning_config.get_config("cub,vit_b16,25")
  assert (config.optimizer, config.schedule, config.weight_decay) == ("adamw", "cosine", 0.05)
  assert config.lr == pytest.approx(5e-4 * 48 / 256) and config.drop_path == 0.1
  assert config.warmup_fraction == 0.05 and config.lr_mult.layer_decay == 0.65
  assert dict(config.lr_mult) == dict(backbone=1.0, head=1.0, projector=1.0,
                                      source_head=1.0, layer_decay=0.65)
  assert bituning_config.get_config("cub,vit_l16,25").lr_mult.layer_decay == 0.75
  resnet = bituning_config.get_config("cub,resnet50,25")
  assert (resnet.optimizer, resnet.lr_mult.layer_decay, resnet.drop_path) == ("sgd", 1.0, 0.0)


@pytest.mark.parametrize("total,warmup", [(100, 0.05), (37, 0.3)])
def test_warmup_cosine_closed_form(total, warmup):
  config = bituning_config.get_config("cub,vit_s16,25")
  config.total_steps, config.warmup_fraction = total, warmup
  schedule = optimizer.learning_rate_schedule(config)
  w = int(warmup * total)
  for step in sorted({0, 1, w - 1, w, w + 1, total // 2, total - 1, total}):
    want = _warmup_cosine_lr(step, lr=config.lr, total=total, warmup=w)
    assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-12), step


@pytest.mark.parametrize("seed", SEEDS)
def test_adamw_with_layer_decay_is_torch_adamw_with_maes_param_groups(seed):
  """A ViT's whole parameter tree (backbone, head, projector) over 8 updates with
  warmup + cosine: the updates of `torch.optim.AdamW` (float64) with one param group per
  tensor, its learning rate the group's multiplier x MAE's layer scale x the schedule,
  its weight decay 0.05, or 0 for vectors, the class token and the positions."""
  total, arch = 8, "vit_demo"
  config = bituning_config.get_config("vit_demo")
  config.total_steps, config.warmup_fraction = total, 0.25
  config.lr_mult.head = 2.0  # a group multiplier beside the layer decay
  depth, decay = models.vit.VARIANTS[arch]["depth"], config.lr_mult.layer_decay
  network = common.Network(arch=arch, num_classes=3, projector_dim=8)
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(network.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  draw = lambda: jax.tree.map(  # noqa: E731
      lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes["params"])
  params = draw()
  flat = traverse_util.flatten_dict(params)
  groups, tensors = [], {}
  for path, value in flat.items():
    scale = config.lr_mult[path[0]] * (_mae_layer_scale(path[1:], depth, decay)
                                       if path[0] == "backbone" else 1.0)
    no_decay = value.ndim < 2 or path[-1] in ("cls_token", "pos_embed")
    tensors[path] = torch.tensor(np.asarray(value, np.float64), requires_grad=True)
    groups.append(dict(params=[tensors[path]], scale=scale, path=path,
                       weight_decay=0.0 if no_decay else config.weight_decay))
  assert {round(g["scale"], 6) for g in groups} >= {round(decay ** 5, 6), 1.0, 2.0}
  opt = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
  tx = optimizer.make_optimizer(config)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  w = int(0.25 * total)
  for step in range(total):
    grads = draw()
    flat_grads = traverse_util.flatten_dict(grads)
    for group in opt.param_groups:
      group["lr"] = group["scale"] * _warmup_cosine_lr(step, lr=config.lr, total=total,
                                                       warmup=w)
      group["params"][0].grad = torch.tensor(np.asarray(flat_grads[group["path"]],
                                                        np.float64))
    before = {p: t.detach().clone() for p, t in tensors.items()}
    opt.step()
    updates, opt_state = update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    for path, u in traverse_util.flatten_dict(updates).items():
      want = (tensors[path].detach() - before[path]).numpy()
      np.testing.assert_allclose(u, want, rtol=2e-5, atol=1e-5 * np.abs(want).max() + 1e-12,
                                 err_msg=f"seed {seed}, update {step}, {'/'.join(path)}")


@pytest.mark.parametrize("overrides,says", [
    (dict(arch="resnet50", drop_path=0.1), "drop_path is for Vision Transformers"),
    (dict(arch="resnet50", **{"lr_mult.layer_decay": 0.5}),
     "lr_mult.layer_decay is for Vision Transformers"),
    (dict(arch="vit_s16", schedule="step", warmup_fraction=0.1),
     "warmup_fraction 0.1 needs schedule='cosine'"),
    (dict(arch="vit_s16", **{"lr_mult.layer_decay": 1.5}), "lr_mult.layer_decay must be"),
    (dict(arch="vit_s16", optimizer="lamb"), "optimizer must be one of sgd, adamw"),
])
def test_recipe_fields_that_cannot_train_are_refused(overrides, says):
  from bitune_jax.training import config_base  # pylint: disable=g-import-not-at-top
  config = bituning_config.get_config(f"cub,{overrides.pop('arch')},25")
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=re.escape(says)):
    config_base.validate(config)
