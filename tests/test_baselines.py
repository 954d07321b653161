"""Baselines (L2-SP, BSS, center loss, GPT*): each trains on 8 devices, and each penalty
matches an independent NumPy computation on fresh random inputs; GPT*'s step (InfoNCE
against the queue before the batch's keys, CE, the total, the keys enqueued) against
NumPy float64 from a perturbed state (harness and references: `method_references.py`).
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax import convert, methods, models, sharding
from bitune_jax.training import config_base
from bitune_jax.methods import bss, center_loss, common, gpt_star, l2sp
from bitune_jax.training import loop
import fakes  # noqa: E402  pylint: disable=g-import-not-at-top
import method_references  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"l2sp": l2sp, "bss": bss, "center_loss": center_loss, "gpt_star": gpt_star}
DEFAULTS = {"l2sp": dict(alpha=0.01, beta=0.01), "bss": dict(eta=0.001, k=1),
            "center_loss": dict(trade_off=0.003, alpha=0.5),
            "gpt_star": dict(queue_size=1024, projector_dim=128, temperature=0.07,
                             trade_off=1.0, ema_momentum=0.999)}
QUEUE = 64  # GPT*'s queue in the tests
RTOL = method_references.RTOL


def _config_module(name):
  """`configs/<name>.py`, under a name that cannot clash with the method modules."""
  spec = importlib.util.spec_from_file_location(
      f"_baseline_config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config(name):
  config = _config_module(name).get_config("demo")
  config.init_from = ""
  config.image_size = 16
  config.batch_size = 16
  config.eval_batch_size = 64
  config.total_steps = 6
  config.log_every = config.eval_every = config.checkpoint_every = 3
  if name == "gpt_star":
    config.gpt_star.queue_size = QUEUE
  return config


def _setup(name):
  """`loop.setup` on 8 devices of the method `name` (the module's `METHOD`)."""
  assert methods.get(name) is MODULES[name].METHOD
  config, mesh = _config(name), sharding.make_mesh()
  return config, mesh, loop.setup(config, mesh)


class Runner:
  """Steps a run and keeps, per step, the numpy batch and the metrics."""

  def __init__(self, config, mesh, run):
    self.config, self.mesh, self.run, self.state = config, mesh, run, run.state
    self.losses = []
    self.batches = fakes.view_batches(run)

  def step(self):
    batch = next(self.batches)
    self.state, metrics = self.run.train_step(
        self.state, sharding.global_batch(batch, self.mesh))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self.losses.append(metrics["loss"])
    return batch, metrics

  def host_state(self):
    return jax.device_get(self.state)  # before the next step donates it

  def check_trained(self, initial_params):
    assert len(self.losses) == 3 and np.all(np.isfinite(self.losses)), self.losses
    assert len(set(self.losses)) == 3, self.losses  # moving
    kernel = self.state.params["head"]["dense"]["kernel"]
    assert len(kernel.sharding.device_set) == 8
    assert not np.allclose(np.asarray(kernel), initial_params["head"]["dense"]["kernel"])


def _forward(model, params, batch_stats, images):
  """Train-mode outputs and statistics of the whole (unsharded) batch, one device."""
  fn = jax.jit(lambda p, s, x: common.forward(model, p, s, x, train=True))
  return jax.device_get(fn(params, batch_stats, images))


def _tree_sq(tree):
  return sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", sorted(MODULES))
def test_configs(name):
  for arg in ("demo", "cub,resnet50,25"):
    config = _config_module(name).get_config(arg)
    config_base.validate(config)
    assert config.method == name
    assert dict(config[name]) == DEFAULTS[name]
  assert (MODULES[name].METHOD.views == "two") == (name == "gpt_star")
  if name == "l2sp":
    assert config.weight_decay == 0.0  # the penalty replaces the decay


@pytest.mark.parametrize("name, penalty", [("l2sp", "the L2-SP penalty"),
                                           ("delta", "DELTA's penalty")])
def test_a_penalty_method_with_weight_decay_says_so(name, penalty):
  """L2-SP's and DELTA's penalties replace weight decay (their configs set 0): a decay
  given anyway trains, and is said once, when the step is made."""
  config = fakes.tiny_config(name, weight_decay=1e-4)
  with fakes.our_log("WARNING") as records:
    methods.get(name).step_config(config)
  assert [r.getMessage() for r in records] == [
      f"{name} with weight_decay=0.0001: the optimizer also decays every group towards "
      f"0, on top of {penalty} (configs/{name}.py sets 0)"]
  with fakes.our_log("WARNING") as records:
    methods.get(name).step_config(fakes.tiny_config(name))
  assert not records


# --------------------------------------------------------------------------- L2-SP
def test_l2sp_penalty_and_gradient_match_numpy():
  rng = np.random.default_rng(0)
  shapes = {"conv": {"kernel": (3, 3, 2, 4)}, "bn": {"scale": (4,), "bias": (4,)}}

  def make():
    return jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
  backbone, w0 = make(), make()
  head = {"kernel": rng.standard_normal((4, 3)).astype(np.float32),
          "bias": rng.standard_normal(3).astype(np.float32)}
  alpha, beta = 0.3, 0.07
  value, sp, l2 = l2sp.l2sp_penalty(backbone=backbone, w0=w0, head=head, alpha=alpha,
                                    beta=beta)
  diff = jax.tree.map(lambda a, b: a.astype(np.float64) - b, backbone, w0)
  expected = alpha / 2 * _tree_sq(diff) + beta / 2 * _tree_sq(head)
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  np.testing.assert_allclose(float(sp), _tree_sq(diff), rtol=1e-5)
  np.testing.assert_allclose(float(l2), _tree_sq(head), rtol=1e-5)
  grads = jax.grad(lambda b, h: l2sp.l2sp_penalty(backbone=b, w0=w0, head=h,
                                                  alpha=alpha, beta=beta)[0],
                   argnums=(0, 1))(backbone, head)
  for g, d in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(diff)):
    np.testing.assert_allclose(g, alpha * d, rtol=1e-5, atol=1e-7)
  for g, h in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(head)):
    np.testing.assert_allclose(g, beta * h, rtol=1e-5, atol=1e-7)


def test_l2sp_trains_and_w0_is_the_backbone_it_starts_from(tmp_path):
  config, mesh = _config("l2sp"), sharding.make_mesh()
  # A known backbone, loaded as every run loads one: a converted checkpoint.
  variables = jax.device_get(dict(models.create_backbone(config.arch).init(
      jax.random.PRNGKey(7), jnp.zeros((1, config.image_size, config.image_size, 3)))))
  rng = np.random.default_rng(1)
  variables["params"] = jax.tree.map(
      lambda w: (w + 0.05 * rng.standard_normal(w.shape)).astype(np.float32),
      variables["params"])
  loaded = variables["params"]
  config.init_from = str(tmp_path / "backbone.npz")
  convert.save_converted({"backbone": variables, "report": {
      "format": "test", "arch": config.arch, "kind": "supervised", "notes": [],
      "dropped": []}}, config.init_from)
  run = loop.setup(config, mesh)
  initial = jax.device_get(run.state)
  for a, b in zip(jax.tree.leaves(initial.extras["w0"]), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)  # w0: the loaded backbone, before step 1
  runner = Runner(config, mesh, run)
  _, first = runner.step()
  assert first["sp_distance"] == 0.0  # exactly: w0 is the backbone of step 0
  head = initial.params["head"]
  np.testing.assert_allclose(first["l2sp"], 0.005 * _tree_sq(head), rtol=1e-5)
  np.testing.assert_allclose(first["loss"], first["ce"] + first["l2sp"], rtol=1e-6)
  before = runner.host_state()
  for a, b in zip(jax.tree.leaves(before.extras["w0"]), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  _, second = runner.step()
  diff = jax.tree.map(lambda w, w0: w.astype(np.float64) - w0,
                      before.params["backbone"], loaded)
  assert _tree_sq(diff) > 0
  expected = 0.005 * _tree_sq(diff) + 0.005 * _tree_sq(before.params["head"])
  np.testing.assert_allclose(second["l2sp"], expected, rtol=1e-4)
  runner.step()
  for a, b in zip(jax.tree.leaves(jax.device_get(runner.state.extras["w0"])),
                  jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)  # unchanged after step 0
  runner.check_trained(initial.params)


# --------------------------------------------------------------------------- BSS
@pytest.mark.parametrize("shape, k", [((16, 64), 1), ((40, 8), 3)])
def test_bss_penalty_and_gradient_match_numpy_svd(shape, k):
  features = np.random.default_rng(k).standard_normal(shape).astype(np.float32)
  u, s, vt = np.linalg.svd(features.astype(np.float64), full_matrices=False)
  value, grad = jax.value_and_grad(lambda f: bss.bss_penalty(features=f, k=k))(features)
  np.testing.assert_allclose(float(value), np.sum(s[-k:] ** 2), rtol=1e-4)
  # d sigma_i^2 / dF = 2 sigma_i u_i v_i^T (sign-free: u_i and v_i flip together).
  expected = sum(2 * s[i] * np.outer(u[:, i], vt[i]) for i in range(len(s) - k, len(s)))
  np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-4)


def test_bss_rejects_a_bad_k():
  with pytest.raises(ValueError, match="k must be"):
    bss.bss_penalty(features=jnp.ones((4, 3)), k=4)
  config = _config("bss")
  config.bss.k = 17  # > batch_size 16
  with pytest.raises(ValueError, match="bss.k must be"):
    config_base.validate(config)  # refused with the config, before anything loads


def test_bss_trains_with_the_global_batch_spectrum():
  config, mesh, run = _setup("bss")
  initial = jax.device_get(run.state)
  runner = Runner(config, mesh, run)
  batch, metrics = runner.step()
  out, _ = _forward(run.model, initial.params, initial.batch_stats, batch["image"])
  s = np.linalg.svd(out["features"].astype(np.float64), compute_uv=False)  # 16 values
  np.testing.assert_allclose(metrics["bss"], s[-1] ** 2, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], metrics["ce"] + 0.001 * metrics["bss"],
                             rtol=1e-6)
  runner.step()
  runner.step()
  runner.check_trained(initial.params)


# --------------------------------------------------------------------------- center loss
def _wen_loop(features, centers, labels, alpha):
  """Wen et al.'s rule, one class and one sample at a time (float64)."""
  new = centers.astype(np.float64).copy()
  for j in range(centers.shape[0]):
    total, count = np.zeros(centers.shape[1]), 0
    for h, y in zip(features, labels):
      if y == j:
        total += centers[j] - h
        count += 1
    new[j] = centers[j] - alpha * total / (1 + count)
  loss = np.mean([0.5 * np.sum((h - centers[y]) ** 2) for h, y in zip(features, labels)])
  return loss, new


def test_center_loss_and_update_match_a_per_sample_loop():
  rng = np.random.default_rng(0)
  features = rng.standard_normal((12, 5)).astype(np.float32)
  centers = rng.standard_normal((4, 5)).astype(np.float32)
  labels = np.array([0, 2, 2, 0, 1, 2, 0, 0, 2, 1, 2, 2], np.int32)  # class 3 absent
  loss, expected = _wen_loop(features, centers, labels, alpha=0.5)
  value = center_loss.center_loss(features=features, centers=centers, labels=labels)
  np.testing.assert_allclose(float(value), loss, rtol=1e-5)
  new = center_loss.update_centers(centers=centers, features=features, labels=labels,
                                   alpha=0.5)
  np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new[3], centers[3])
  grad = jax.grad(lambda f: center_loss.center_loss(features=f, centers=centers,
                                                    labels=labels))(features)
  np.testing.assert_allclose(grad, (features - centers[labels]) / 12, rtol=1e-5,
                             atol=1e-7)


def test_center_loss_trains_and_moves_the_centers():
  config, mesh, run = _setup("center_loss")
  initial = jax.device_get(run.state)
  centers = initial.extras["centers"]
  assert centers.shape == (5, 64) and not centers.any()  # [C, F], zeros
  runner = Runner(config, mesh, run)
  runner.step()
  before = runner.host_state()
  batch, metrics = runner.step()
  out, _ = _forward(run.model, before.params, before.batch_stats, batch["image"])
  loss, expected = _wen_loop(out["features"].astype(np.float64),
                             before.extras["centers"], batch["label"], alpha=0.5)
  np.testing.assert_allclose(metrics["center_loss"], loss, rtol=1e-4)
  np.testing.assert_allclose(jax.device_get(runner.state.extras["centers"]), expected,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics["loss"],
                             metrics["ce"] + 0.003 * metrics["center_loss"], rtol=1e-6)
  runner.step()
  runner.check_trained(initial.params)


# --------------------------------------------------------------------------- GPT*
def test_gpt_star_enqueues_the_keys_and_moves_the_key_encoder_by_ema():
  config, mesh, run = _setup("gpt_star")
  initial = jax.device_get(run.state)
  assert initial.extras["queue"].keys.shape == (QUEUE, 128)
  runner = Runner(config, mesh, run)
  runner.step()
  before = runner.host_state()
  batch, metrics = runner.step()
  after = runner.host_state()
  m = 0.999
  expected = jax.tree.map(lambda k, q: m * k.astype(np.float64) + (1 - m) * q,
                          before.key_params, before.params)
  for a, b in zip(jax.tree.leaves(after.key_params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The keys: the EMA'd key encoder on the second view, normalised, behind the pointer.
  out, stats = _forward(run.model, expected, before.key_batch_stats, batch["image_k"])
  z_k = out["projection"] / np.linalg.norm(out["projection"], axis=-1, keepdims=True)
  ptr = int(before.extras["queue"].ptr)
  assert ptr == 16 and int(after.extras["queue"].ptr) == 32
  keys, old = after.extras["queue"].keys, before.extras["queue"].keys
  np.testing.assert_allclose(keys[16:32], z_k, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.delete(keys, np.s_[16:32], 0),
                                np.delete(old, np.s_[16:32], 0))
  for a, b in zip(jax.tree.leaves(after.key_batch_stats), jax.tree.leaves(stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics["loss"], metrics["ce"] + metrics["info_nce"],
                             rtol=1e-6)
  runner.step()
  runner.check_trained(initial.params)


def test_gpt_star_info_nce_matches_numpy(monkeypatch):
  seed, temperature, trade_off = 7, 0.1, 0.5  # neither default (0.07, 0.2)
  config = fakes.tiny_config("gpt_star", gpt_star=dict(
      queue_size=64, temperature=temperature, trade_off=trade_off))
  mesh, run = method_references.setup(config, monkeypatch)
  state = method_references.perturbed(run, np.random.default_rng(seed))
  batch = next(iter(run.data.train_batches(0)))
  before, _, metrics, after = method_references.one_step(run, mesh, state, batch)
  msg = f"seed {seed}"
  key_params = method_references.expected_ema(before, config.gpt_star.ema_momentum)
  key_out, _ = method_references.forward(run.model, key_params, before.key_batch_stats,
                                         batch["image_k"])
  z_k = method_references.normalize(np, key_out["projection"])
  out, _ = method_references.forward(run.model, before.params, before.batch_stats,
                                     batch["image_q"])
  z_q = method_references.normalize(np, out["projection"])
  queue = np.float64(before.extras["queue"].keys)  # before this batch's keys
  info_nce = np.mean(method_references.info_nce(z_q, z_k, queue, temperature))
  ce = method_references.cross_entropy(out["logits"], batch["label"])
  np.testing.assert_allclose(metrics["info_nce"], info_nce, rtol=RTOL, err_msg=msg)
  np.testing.assert_allclose(metrics["ce"], ce, rtol=RTOL, err_msg=msg)
  np.testing.assert_allclose(metrics["loss"], ce + trade_off * info_nce, rtol=RTOL,
                             err_msg=msg)
  slots = (int(before.extras["queue"].ptr) + np.arange(16)) % 64
  np.testing.assert_allclose(after.extras["queue"].keys[slots], z_k, rtol=1e-4,
                             atol=1e-5, err_msg=msg)
