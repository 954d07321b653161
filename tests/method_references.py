"""What the tests of several methods share: a harness that takes one real train step
and the NumPy float64 references it is checked against, and a small converted
checkpoint with the tiny run config built on it.

The step harness (`setup`, `perturbed`, `one_step`): a real `run.train_step` on 8
devices, taken from a state read back just before it (the state is donated), its
views those the run's step makes. The references are written from DESIGN.md:
`forward` is the library's `common.forward` on the whole batch on one device
(BatchNorm is global under jit), in float64; the EMA of the key encoder, the
log-softmax, InfoNCE and cross-entropy in NumPy; `check_update` applies the step's
optimizer to an independent gradient. Nothing here calls `bitune_jax.losses` or
`bitune_jax.queues`.

`perturbed` moves the state off its init before a step (key encoder != query encoder,
random queue pointers), so that a step which skips the EMA, forwards the wrong encoder
or ignores the pointers shows.

`ckpt` (a module fixture) and `run_config`: the README-feature runs of
`test_bituning.py`, `test_cotuning.py` and `test_optimizer.py` (resnet_small, 16 x 16
digits, batch 16, 8 simulated devices) from one bitune-convert style file.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from bitune_jax import convert, models, sharding
from bitune_jax.data import input as input_lib
from bitune_jax.methods import common, optimizer
from bitune_jax.training import loop

RTOL = 1e-4  # float32 step (8 devices) vs float64 reference on one device's forward


# --------------------------------------------------------------------------- one step
def setup(config, monkeypatch, workdir=None):
  """`loop.setup` on 8 devices; `config.num_classes` may differ from the digits' 5
  (the test then draws its own labels)."""
  real_load = input_lib.load
  monkeypatch.setattr(input_lib, "load", lambda c, needs: dataclasses.replace(
      real_load(c, needs), num_classes=c.num_classes))
  mesh = sharding.make_mesh()
  return mesh, loop.setup(config, mesh, workdir=workdir)


@functools.lru_cache(maxsize=None)
def _jitted_forward(model):
  return jax.jit(functools.partial(common.forward, model, train=True))


def forward(model, params, batch_stats, images):
  """Train-mode outputs and new statistics of the whole batch on one device, float64."""
  out = _jitted_forward(model)(params, batch_stats, images)
  return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(out))


def perturbed(run, rng):
  """The initial state with the key encoder moved off the query encoder and the queue
  pointers at random slots (real classes only), back on the run's shardings."""
  state = jax.device_get(run.state)
  key_params = jax.tree.map(
      lambda w: (w + (0.1 * np.std(w) + 0.01) * rng.standard_normal(w.shape)
                 ).astype(np.float32), state.params)
  extras = {}
  for name, q in state.extras.items():
    if q.keys.ndim == 3:  # per-class queues [C', K, D]: padding rows keep pointer 0
      ptr = np.zeros_like(q.ptr)
      ptr[:run.model.num_classes] = rng.integers(0, q.keys.shape[1],
                                                 run.model.num_classes)
    else:  # a FIFO queue [N, D]
      ptr = np.asarray(rng.integers(0, q.keys.shape[0]), q.ptr.dtype)
    extras[name] = q.replace(ptr=ptr)
  return jax.device_put(state.replace(key_params=key_params, extras=extras),
                        run.state_shardings)


@functools.lru_cache(maxsize=None)
def _jitted_views(views_spec):
  from bitune_jax.data.views import batch  # pylint: disable=g-import-not-at-top
  return jax.jit(batch.make_views(views_spec))


def _views(run):
  return _jitted_views(run.data.view_spec)


_METHOD_STEPS = {}


def _method_step(run):
  """The run's method step, jitted as `loop.setup` jits the whole step."""
  if id(run) not in _METHOD_STEPS:
    rep = sharding.replicated(sharding.make_mesh())
    _METHOD_STEPS[id(run)] = (run, jax.jit(
        run.method_step, in_shardings=(run.state_shardings, None),
        out_shardings=(run.state_shardings, rep), donate_argnums=0))
  return _METHOD_STEPS[id(run)][1]


def one_step(run, mesh, state, batch):
  """One real step: `(before, state, metrics, after)`, before and after on the host."""
  before = jax.device_get(state)  # the step donates `state`
  # The method's step on the views of the uint8 images (those the run's step makes:
  # keys from seed, step, row, view), which the references then read.
  batch.update(jax.device_get(_views(run)(batch, before.step)))
  views = {k: v for k, v in batch.items() if k not in ("image_u8", "hw")}
  state, metrics = _method_step(run)(state, sharding.global_batch(views, mesh))
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  after = jax.device_get(state)
  assert int(after.step) == int(before.step) + 1  # the step counts itself
  return before, state, metrics, after


def expected_ema(before, m):
  return jax.tree.map(lambda k, q: m * np.float64(k) + (1 - m) * np.float64(q),
                      before.key_params, before.params)


def assert_tree_close(actual, expected, *, rtol, atol, what):
  flat_a = jax.tree_util.tree_leaves_with_path(actual)
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e), what
  for (path, a), e in zip(flat_a, flat_e):
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


def check_update(config, before, after, grads, msg):
  """The params moved by the step's optimizer applied to `grads` (an independent
  gradient), and that check has the power to tell CE alone from the full loss."""
  update = jax.jit(optimizer.make_optimizer(config).update)
  updates = jax.device_get(update(grads, before.opt_state, before.params)[0])
  for (path, got), old, step in zip(jax.tree_util.tree_leaves_with_path(after.params),
                                    jax.tree.leaves(before.params),
                                    jax.tree.leaves(updates)):
    # 1e-3 of the update, plus the float32 rounding of the stored parameter.
    bound = 1e-3 * (np.abs(step) + np.max(np.abs(step))) + 2 * np.spacing(np.abs(got))
    excess = np.abs(np.float64(got) - (np.float64(old) + step)) - bound
    assert np.all(excess <= 0), (
        f"{msg} update {jax.tree_util.keystr(path)}: off by up to {np.max(excess):.3g} "
        f"beyond the bound, update scale {np.max(np.abs(step)):.3g}")
  if "projector" not in grads:
    return
  # CE alone leaves the projector's gradient at zero: its update would differ from
  # the full loss's far beyond the bound above.
  no_aux = dict(grads, projector=jax.tree.map(np.zeros_like, grads["projector"]))
  ce_updates = jax.device_get(update(no_aux, before.opt_state, before.params)[0])
  for step, ce_step in zip(jax.tree.leaves(updates["projector"]),
                           jax.tree.leaves(ce_updates["projector"])):
    assert np.max(np.abs(step - ce_step)) > 0.1 * np.max(np.abs(step)), msg


# --------------------------------------------------------------------------- references
def log_softmax(xp, x):
  peak = xp.max(x, axis=-1, keepdims=True)
  return x - peak - xp.log(xp.sum(xp.exp(x - peak), axis=-1, keepdims=True))


def normalize(xp, x):
  return x / xp.linalg.norm(x, axis=-1, keepdims=True)


def info_nce(query, key, queue, tau):
  """`[B]` -log softmax of the positive among `[q.k, q.queue]` / tau."""
  logits = np.concatenate([np.sum(query * key, 1)[:, None], query @ queue.T], 1) / tau
  return -log_softmax(np, logits)[:, 0]


def cross_entropy(logits, labels):
  return -np.mean(log_softmax(np, logits)[np.arange(len(labels)), labels])


# --------------------------------------------------------------------------- README runs
SEED = 0  # config.seed of every run built by `run_config`
CKPT_SEED = 3  # the converted checkpoint's random backbone, statistics and source head
CLASSES, K = 5, 4  # digits 5-9; Bi-tuning's slots per class


def run_config(module, **overrides):
  """`module` (a `configs/<name>.py`)'s demo, tiny, seed `SEED`; Bi-tuning's queues
  of `K` slots per class unless `overrides` set them."""
  config = fakes.tiny_config(module.get_config("demo").method, seed=SEED, **overrides)
  if config.method == "bituning" and "queue_size" not in overrides.get("bituning", {}):
    config.bituning.queue_size = K
  return config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A bitune-convert style file: a random resnet_small backbone, BatchNorm statistics
  drawn at random (not the init's 0 and 1, so that they identify the file) and a
  5-class source head."""
  rng = np.random.default_rng(CKPT_SEED)
  variables = jax.device_get(dict(models.create_backbone("resnet_small").init(
      jax.random.PRNGKey(CKPT_SEED), jnp.zeros((1, 16, 16, 3)))))
  draw = {"mean": lambda shape: rng.normal(0.0, 0.1, shape),
          "var": lambda shape: rng.uniform(0.5, 1.5, shape)}
  variables["batch_stats"] = jax.tree_util.tree_map_with_path(
      lambda path, x: draw[path[-1].key](x.shape).astype(np.float32),
      variables["batch_stats"])
  head = {"kernel": rng.standard_normal((64, CLASSES)),
          "bias": rng.standard_normal(CLASSES)}
  result = {"backbone": variables,
            "source_head": jax.tree.map(lambda x: x.astype(np.float32), head),
            "report": {"format": "test", "arch": "resnet_small", "kind": "supervised",
                       "notes": [], "dropped": []}}
  path = str(tmp_path_factory.mktemp("ckpt") / "backbone.npz")
  convert.save_converted(result, path)
  return path
