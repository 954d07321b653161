"""Each method's train step on 8 devices against an independent computation.

A real `run.train_step` is taken from a state read back just before it (the state is
donated) and checked against NumPy float64 written from DESIGN.md: the EMA of the key
encoder, the keys each queue receives and where, the pointers, every loss term and the
total recomputed from the forward outputs (the library's `common.forward` on the whole
batch on one device: BatchNorm is global under jit), and, for Bi-tuning, the parameter
update (the gradient really holds CCE and CCL, not CE alone). Nothing here calls
`bitune_jax.losses` or `bitune_jax.queues`.

The state is perturbed before the first step (key encoder != query encoder, random
queue pointers, a random Co-Tuning relationship) so that a step which skips the EMA,
forwards the wrong encoder, ignores the pointers or reads the wrong row shows.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from bitune_jax import convert, models, sharding
from bitune_jax.data.views import cutmix
from bitune_jax.data import input as input_lib
from bitune_jax.methods import common
from bitune_jax.training import loop

RTOL = 1e-4  # float32 step (8 devices) vs float64 reference on one device's forward


_config = fakes.tiny_config  # `configs/<name>.py:demo`, tiny


def _setup(config, monkeypatch, workdir=None):
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


def _forward(model, params, batch_stats, images):
  """Train-mode outputs and new statistics of the whole batch on one device, float64."""
  out = _jitted_forward(model)(params, batch_stats, images)
  return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(out))


def _perturbed(run, rng):
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


def _step(run, mesh, state, batch):
  """One real step: `(before, state, metrics, after)`, before and after on the host."""
  before = jax.device_get(state)  # the step donates `state`
  # The method's step on the views of the uint8 images (those the run's step makes:
  # keys from seed, step, row, view), which the references below then read.
  batch.update(jax.device_get(_views(run)(batch, before.step)))
  views = {k: v for k, v in batch.items() if k not in ("image_u8", "hw")}
  state, metrics = _method_step(run)(state, sharding.global_batch(views, mesh))
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  after = jax.device_get(state)
  assert int(after.step) == int(before.step) + 1  # the step counts itself
  return before, state, metrics, after


def _expected_ema(before, m):
  return jax.tree.map(lambda k, q: m * np.float64(k) + (1 - m) * np.float64(q),
                      before.key_params, before.params)


def _assert_tree_close(actual, expected, *, rtol, atol, what):
  flat_a = jax.tree_util.tree_leaves_with_path(actual)
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e), what
  for (path, a), e in zip(flat_a, flat_e):
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


# --------------------------------------------------------------------------- references
def _log_softmax(xp, x):
  peak = xp.max(x, axis=-1, keepdims=True)
  return x - peak - xp.log(xp.sum(xp.exp(x - peak), axis=-1, keepdims=True))


def _normalize(xp, x):
  return x / xp.linalg.norm(x, axis=-1, keepdims=True)


def _class_kl(xp, *, own, slots, labels):
  """DESIGN.md's CCE/CCL: candidates = own then every slot (class-major), `own [B]`,
  `slots [B, C, K]` (already / tau); target uniform 1/(K+1) over own and the K slots of
  the query's class; KL(target || softmax), batch mean."""
  batch, classes, size = slots.shape
  logits = xp.concatenate([own[:, None], slots.reshape(batch, classes * size)], axis=1)
  target = np.zeros((batch, 1 + classes * size))
  target[:, 0] = 1.0 / (size + 1)
  for b, c in enumerate(labels):
    target[b, 1 + c * size:1 + (c + 1) * size] = 1.0 / (size + 1)
  cross = -xp.sum(target * _log_softmax(xp, logits), axis=1)  # [B]
  return xp.mean(cross - np.log(size + 1))  # minus the target's entropy


def _bituning_terms(xp, *, out, kernel, bias, z_key, queue_h, queue_z, labels, tau):
  """`(ce, cce, ccl)` from the query's outputs; `queue_h [C, K, F+1]` and
  `queue_z [C, K, D]` hold the real classes only."""
  batch = labels.shape[0]
  stop = jax.lax.stop_gradient if xp is jnp else (lambda x: x)
  ce = -xp.mean(_log_softmax(xp, out["logits"])[np.arange(batch), labels])
  w_hat = stop(_normalize(xp, xp.concatenate([kernel[:, labels].T, bias[labels][:, None]],
                                             axis=1)))  # [B, F+1]
  h_hat = _normalize(xp, xp.concatenate([out["features"], xp.ones((batch, 1))], axis=1))
  cce = ccl = None  # None: a term without its queue
  if queue_h is not None:
    cce = _class_kl(xp, own=xp.sum(h_hat * w_hat, axis=1) / tau,
                    slots=xp.einsum("bx,ckx->bck", w_hat, queue_h) / tau, labels=labels)
  if queue_z is not None:
    z_q = _normalize(xp, out["projection"])
    ccl = _class_kl(xp, own=xp.sum(z_q * z_key, axis=1) / tau,
                    slots=xp.einsum("bd,ckd->bck", z_q, queue_z) / tau, labels=labels)
  return ce, cce, ccl


def _enqueue_one_at_a_time(keys, ptr, new, labels):
  """Per-class queues `[C, K, D]`, one key at a time in batch order."""
  keys, ptr = np.array(keys, np.float64), np.array(ptr)
  for key, c in zip(new, labels):
    keys[c, ptr[c]] = key
    ptr[c] = (ptr[c] + 1) % keys.shape[1]
  return keys, ptr


def _info_nce(query, key, queue, tau):
  """`[B]` -log softmax of the positive among `[q.k, q.queue]` / tau."""
  logits = np.concatenate([np.sum(query * key, 1)[:, None], query @ queue.T], 1) / tau
  return -_log_softmax(np, logits)[:, 0]


def _ce(logits, labels):
  return -np.mean(_log_softmax(np, logits)[np.arange(len(labels)), labels])


# --------------------------------------------------------------------------- Bi-tuning
BITUNING = [  # every temperature, trade-off, queue order and queue layout appears
    dict(seed=0, classes=5, shard_queues=True, temperature=0.07, trade_off=1.0,
         cce_after_enqueue=True, queue_size=4, ema_momentum=0.999),  # 5 in 8 rows
    dict(seed=1, classes=7, shard_queues=False, temperature=0.2, trade_off=0.3,
         cce_after_enqueue=False, queue_size=3, ema_momentum=0.99),  # 7 rows
    dict(seed=2, classes=3, shard_queues=True, temperature=0.5, trade_off=0.3,
         cce_after_enqueue=True, queue_size=5, ema_momentum=0.999),  # 3 in 8 rows
    # Loss weights (Table 5's ablations): a zero-weight term and what only it needs
    # (its queue; for the CCL, the projector) are absent.
    dict(seed=3, classes=5, shard_queues=True, temperature=0.1, trade_off=0.7,
         cce_after_enqueue=True, queue_size=4, ema_momentum=0.99, ce_weight=0.5,
         cce_weight=0.0, ccl_weight=2.0),
    dict(seed=4, classes=5, shard_queues=False, temperature=0.07, trade_off=1.0,
         cce_after_enqueue=False, queue_size=3, ema_momentum=0.999, ce_weight=0.0,
         cce_weight=1.5, ccl_weight=0.0),
]
WEIGHTS = ("ce_weight", "cce_weight", "ccl_weight")


def _bituning_run(case, monkeypatch):
  config = _config("bituning", num_classes=case["classes"],
                   shard_queues=case["shard_queues"],
                   bituning={k: case.get(k, 1.0) for k in (
                       "temperature", "trade_off", "cce_after_enqueue", "queue_size",
                       "ema_momentum") + WEIGHTS})
  mesh, run = _setup(config, monkeypatch)
  rng = np.random.default_rng(case["seed"])
  state = _perturbed(run, rng)
  batches = []
  for _, batch in zip(range(2), run.data.train_batches(0)):
    if case["classes"] != 5:  # labels of our own for another class count
      batch["label"] = rng.integers(0, case["classes"], 16).astype(np.int32)
    batches.append(batch)
  first, state, _, _ = _step(run, mesh, state, batches[0])
  before, _, metrics, after = _step(run, mesh, state, batches[1])
  return config, run, (first, batches[0]), batches[1], before, after, metrics


def _check_enqueue(before, after, keys, labels, *, classes, size, msg):
  """`keys` (a dict of `[B, X]` per queue) went one at a time into their class's
  queue; the pointers moved by the counts; padding rows untouched. Returns the
  expected real rows of each queue."""
  expected = {}
  for name, new in keys.items():
    old, got = before.extras[name], after.extras[name]
    rows, ptr = _enqueue_one_at_a_time(old.keys[:classes], old.ptr[:classes], new, labels)
    expected[name] = rows
    np.testing.assert_allclose(got.keys[:classes], rows, rtol=1e-4, atol=1e-5,
                               err_msg=f"{msg} {name} keys")
    np.testing.assert_array_equal(got.ptr[:classes], ptr, err_msg=f"{msg} {name} ptr")
    np.testing.assert_array_equal(
        got.ptr[:classes], (old.ptr[:classes] + np.bincount(labels, minlength=classes))
        % size, err_msg=f"{msg} {name} ptr")
    np.testing.assert_array_equal(got.keys[classes:], old.keys[classes:], err_msg=msg)
    np.testing.assert_array_equal(got.ptr[classes:], old.ptr[classes:], err_msg=msg)
  return expected


def _check_update(config, before, after, grads, msg):
  """The params moved by the step's optimizer applied to `grads` (an independent
  gradient), and that check has the power to tell CE alone from the full loss."""
  update = jax.jit(common.make_optimizer(config).update)
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


@pytest.mark.parametrize("case", BITUNING, ids=lambda c: f"seed{c['seed']}")
def test_bituning_step_matches_numpy(case, monkeypatch):
  config, run, (first, first_batch), batch, before, after, metrics = _bituning_run(
      case, monkeypatch)
  seed, classes, size = case["seed"], case["classes"], case["queue_size"]
  tau, trade_off, labels = case["temperature"], case["trade_off"], batch["label"]
  w_ce, w_cce, w_ccl = (case.get(k, 1.0) for k in WEIGHTS)
  msg = f"seed {seed}"
  used = {"queue_h": w_cce > 0, "queue_z": w_ccl > 0}
  queue_names = [name for name, on in used.items() if on]
  assert sorted(before.extras) == queue_names, msg  # only the queues in use
  assert ("projector" in before.params) == (w_ccl > 0), msg
  assert sorted(metrics) == sorted(
      ["loss", "train_accuracy"] + [t for t, w in zip(("ce", "cce", "ccl"),
                                                      (w_ce, w_cce, w_ccl)) if w > 0]), msg
  for name in queue_names:
    assert before.extras[name].keys.shape[0] == (
        8 if case["shard_queues"] else classes), msg
  # Step 1 moved each class's pointer by its count in the first batch, mod K.
  first_counts = np.bincount(first_batch["label"], minlength=classes)
  for name in queue_names:
    np.testing.assert_array_equal(
        before.extras[name].ptr[:classes],
        (first.extras[name].ptr[:classes] + first_counts) % size, err_msg=f"{msg} {name}")

  # EMA of every query param, before the keys are computed.
  key_params = _expected_ema(before, case["ema_momentum"])
  _assert_tree_close(after.key_params, key_params, rtol=1e-6, atol=1e-7,
                     what=f"{msg} key_params")
  key_out, key_stats = _forward(run.model, key_params, before.key_batch_stats,
                                batch["image_k"])
  _assert_tree_close(after.key_batch_stats, key_stats, rtol=1e-4, atol=1e-5,
                     what=f"{msg} key_batch_stats")
  keys = {}
  if used["queue_h"]:
    keys["queue_h"] = _normalize(np, np.concatenate([key_out["features"],
                                                     np.ones((16, 1))], 1))
  if used["queue_z"]:
    keys["queue_z"] = z_k = _normalize(np, key_out["projection"])
  else:
    z_k = None
  enqueued = _check_enqueue(before, after, keys, labels, classes=classes, size=size,
                            msg=msg)

  # The loss terms from the query's outputs: CCL against the queue before this batch,
  # CCE before or after this batch's keys were enqueued.
  out, stats = _forward(run.model, before.params, before.batch_stats, batch["image_q"])
  _assert_tree_close(after.batch_stats, stats, rtol=1e-4, atol=1e-5,
                     what=f"{msg} batch_stats")
  queue_h = queue_z = None
  if used["queue_h"]:
    queue_h = np.float64(enqueued["queue_h"] if case["cce_after_enqueue"]
                         else before.extras["queue_h"].keys[:classes])
  if used["queue_z"]:
    queue_z = np.float64(before.extras["queue_z"].keys[:classes])
  head = jax.tree.map(np.float64, before.params["head"]["dense"])
  ce, cce, ccl = _bituning_terms(np, out=out, kernel=head["kernel"], bias=head["bias"],
                                 z_key=z_k, queue_h=queue_h, queue_z=queue_z,
                                 labels=labels, tau=tau)

  def total(ce, cce, ccl):
    return (w_ce * ce + trade_off * ((w_cce * cce if cce is not None else 0)
                                     + (w_ccl * ccl if ccl is not None else 0)))
  for name, value in (("ce", ce), ("cce", cce), ("ccl", ccl),
                      ("loss", total(ce, cce, ccl))):
    if name in metrics:
      np.testing.assert_allclose(metrics[name], value, rtol=RTOL, err_msg=f"{msg} {name}")

  # The update: the gradient of an independent jnp transliteration of the total.
  def loss_fn(params, images):
    out, _ = common.forward(run.model, params, before.batch_stats, images, train=True)
    dense = params["head"]["dense"]
    as_jnp = lambda x: None if x is None else jnp.float32(x)  # noqa: E731
    return total(*_bituning_terms(
        jnp, out=out, kernel=dense["kernel"], bias=dense["bias"], z_key=as_jnp(z_k),
        queue_h=as_jnp(queue_h), queue_z=as_jnp(queue_z), labels=labels, tau=tau))
  # The images sharded as the step's are: float32 sums in the same order. (BatchNorm
  # gradients cancel heavily in the stem: on one device they differ by up to ~2% of
  # the update there.)
  images = sharding.global_batch({"x": batch["image_q"]}, sharding.make_mesh())["x"]
  grads = jax.device_get(jax.jit(jax.grad(loss_fn))(before.params, images))
  _check_update(config, before, after, grads, msg)


# --------------------------------------------------------------------------- Co-Tuning
def _checkpoint(path, seed):
  """A bitune-convert style file: a seeded random resnet_small backbone (He-scaled
  kernels, BatchNorm at identity) and a 5-way source head. NumPy draws: no init to
  compile."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(models.create_backbone("resnet_small").init,
                          jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return (rng.standard_normal(leaf.shape)
              * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)
  convert.save_converted(
      {"backbone": jax.tree_util.tree_map_with_path(fill, dict(shapes)),
       "source_head": {"kernel": rng.standard_normal((64, 5)).astype(np.float32),
                       "bias": rng.standard_normal(5).astype(np.float32)},
       "report": {"format": "test", "arch": "resnet_small", "kind": "supervised",
                  "notes": [], "dropped": []}}, str(path))
  return str(path)


@pytest.mark.parametrize("seed, trade_off", [(3, 2.3), (4, 0.5)])
def test_cotuning_step_matches_numpy(seed, trade_off, tmp_path, monkeypatch):
  config = _config("cotuning", init_from=_checkpoint(tmp_path / "c.npz", seed),
                   cotuning=dict(relationship="direct", trade_off=trade_off))
  mesh, run = _setup(config, monkeypatch, workdir=str(tmp_path / "w"))
  # R with rows far apart, so that a step reading the wrong row shows.
  rng = np.random.default_rng(seed)
  relationship = rng.dirichlet(np.full(5, 0.3), size=5).astype(np.float32)  # [C_t, C_s]
  state = jax.device_put(run.state.replace(extras={"relationship": relationship}),
                         run.state_shardings)
  batch = next(iter(run.data.train_batches(0)))
  before, _, metrics, after = _step(run, mesh, state, batch)
  out, _ = _forward(run.model, before.params, before.batch_stats, batch["image"])
  labels = batch["label"]
  targets = np.float64(relationship)[labels]  # [B, C_s]
  co = -np.mean(np.sum(targets * _log_softmax(np, out["source_logits"]), axis=1))
  ce = _ce(out["logits"], labels)
  msg = f"seed {seed}"
  np.testing.assert_allclose(metrics["co_tuning"], co, rtol=RTOL, err_msg=msg)
  np.testing.assert_allclose(metrics["ce"], ce, rtol=RTOL, err_msg=msg)
  np.testing.assert_allclose(metrics["loss"], ce + trade_off * co, rtol=RTOL, err_msg=msg)
  np.testing.assert_array_equal(after.extras["relationship"], relationship, err_msg=msg)


# --------------------------------------------------------------------------- unsupervised
@pytest.mark.parametrize("seed, temperature, mixed_weight", [(5, 0.2, 1.0),
                                                             (6, 0.5, 0.5)])
def test_unsup_finetune_step_matches_numpy(seed, temperature, mixed_weight, monkeypatch):
  config = _config("unsup_finetune", total_steps=4, unsup=dict(
      queue_size=64, bn_group_size=0, cutmix=True, temperature=temperature,
      mixed_weight=mixed_weight))
  mesh, run = _setup(config, monkeypatch)
  rng = np.random.default_rng(seed)
  state = _perturbed(run, rng)
  batch = next(iter(run.data.train_batches(0)))
  before, _, metrics, after = _step(run, mesh, state, batch)
  msg = f"seed {seed}"

  key_params = _expected_ema(before, config.unsup.ema_momentum)
  _assert_tree_close(after.key_params, key_params, rtol=1e-6, atol=1e-7,
                     what=f"{msg} key_params")
  # Whole-batch BatchNorm: the keys do not depend on the shuffle, so each row must be
  # its own image's key again (unshuffled).
  key_out, key_stats = _forward(run.model, key_params, before.key_batch_stats,
                                batch["image_k"])
  k = _normalize(np, key_out["projection"])  # [B, D]
  _assert_tree_close(after.key_batch_stats, key_stats, rtol=1e-4, atol=1e-5,
                     what=f"{msg} key_batch_stats")
  old, new = before.extras["queue"], after.extras["queue"]
  slots = (int(old.ptr) + np.arange(16)) % 64
  np.testing.assert_allclose(new.keys[slots], k, rtol=1e-4, atol=1e-5, err_msg=msg)
  np.testing.assert_array_equal(np.delete(new.keys, slots, 0),
                                np.delete(old.keys, slots, 0), err_msg=msg)
  assert int(new.ptr) == (int(old.ptr) + 16) % 64, msg

  # Query i is mixed with query i-1; lambda per example from the step's mix rng.
  _, _, mix_rng = jax.random.split(before.rng, 3)
  images = batch["image_q"]
  mixed, lam = cutmix.cutmix(mix_rng, images, np.roll(images, 1, axis=0),
                             alpha=config.unsup.cutmix_alpha)
  lam = np.float64(lam)
  assert lam.shape == (16,) and np.ptp(lam) > 0.1, msg  # per example, not a constant
  out, _ = _forward(run.model, before.params, before.batch_stats,
                    np.concatenate([images, np.asarray(mixed)]))
  z = _normalize(np, out["projection"])
  queue = np.float64(old.keys)
  plain = np.mean(_info_nce(z[:16], k, queue, temperature))
  mixed_loss = np.mean(lam * _info_nce(z[16:], k, queue, temperature)
                       + (1 - lam) * _info_nce(z[16:], np.roll(k, 1, axis=0), queue,
                                               temperature))
  np.testing.assert_allclose(metrics["info_nce"], plain, rtol=RTOL, err_msg=msg)
  np.testing.assert_allclose(metrics["mixed_info_nce"], mixed_loss, rtol=RTOL,
                             err_msg=msg)
  np.testing.assert_allclose(metrics["loss"], plain + mixed_weight * mixed_loss,
                             rtol=RTOL, err_msg=msg)


# --------------------------------------------------------------------------- baselines
def test_finetune_step_matches_numpy(monkeypatch):
  config = _config("finetune")
  mesh, run = _setup(config, monkeypatch)
  batch = next(iter(run.data.train_batches(0)))
  before, _, metrics, _ = _step(run, mesh, run.state, batch)
  out, _ = _forward(run.model, before.params, before.batch_stats, batch["image"])
  ce = _ce(out["logits"], batch["label"])
  np.testing.assert_allclose(metrics["ce"], ce, rtol=RTOL)
  np.testing.assert_allclose(metrics["loss"], ce, rtol=RTOL)


def test_gpt_star_info_nce_matches_numpy(monkeypatch):
  seed, temperature, trade_off = 7, 0.1, 0.5  # neither default (0.07, 0.2)
  config = _config("gpt_star", gpt_star=dict(queue_size=64, temperature=temperature,
                                             trade_off=trade_off))
  mesh, run = _setup(config, monkeypatch)
  state = _perturbed(run, np.random.default_rng(seed))
  batch = next(iter(run.data.train_batches(0)))
  before, _, metrics, after = _step(run, mesh, state, batch)
  msg = f"seed {seed}"
  key_params = _expected_ema(before, config.gpt_star.ema_momentum)
  key_out, _ = _forward(run.model, key_params, before.key_batch_stats, batch["image_k"])
  z_k = _normalize(np, key_out["projection"])
  out, _ = _forward(run.model, before.params, before.batch_stats, batch["image_q"])
  z_q = _normalize(np, out["projection"])
  queue = np.float64(before.extras["queue"].keys)  # before this batch's keys
  info_nce = np.mean(_info_nce(z_q, z_k, queue, temperature))
  ce = _ce(out["logits"], batch["label"])
  np.testing.assert_allclose(metrics["info_nce"], info_nce, rtol=RTOL, err_msg=msg)
  np.testing.assert_allclose(metrics["ce"], ce, rtol=RTOL, err_msg=msg)
  np.testing.assert_allclose(metrics["loss"], ce + trade_off * info_nce, rtol=RTOL,
                             err_msg=msg)
  slots = (int(before.extras["queue"].ptr) + np.arange(16)) % 64
  np.testing.assert_allclose(after.extras["queue"].keys[slots], z_k, rtol=1e-4,
                             atol=1e-5, err_msg=msg)
