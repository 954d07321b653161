"""The training loop: config -> sharded state -> jitted step -> metrics, eval, checkpoints.

Knows no method math: a method module (`bitune_jax.methods`) gives the model, the state
and the step. Resume order: the workdir's own checkpoint, then `config.init_from`
(a bitune-convert output), then random initialisation.
"""

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from bitune_jax import checkpoint, config_base, convert, evaluate, files, methods, queues
from bitune_jax import sharding, stopping, workdir_lock
from bitune_jax.data import input as input_lib
from bitune_jax.methods import common

log = logging.getLogger("bitune_jax")


# --------------------------------------------------------------------------- input
def _train_batches(run, mesh, start_step):
  """Global training batches from `start_step` on, built ahead of the step."""
  return input_lib.prefetch_to_device(run.data.train_batches(start_step), mesh)


def with_views(step_fn, views):
  """`step(state, batch)` whose batch holds the uint8 cache images: the step's training
  views are made on the device first (`Input.views`, keyed by the step being taken)."""
  def step(state, batch):
    return step_fn(state, views(batch, state.step))
  return step


# --------------------------------------------------------------------------- state
# What a resumed run may change: how long it runs and how often it reports. Any other
# change would make the checkpoint and `config.json` describe different runs.
RESUMABLE = ("total_steps", "eval_every", "log_every", "checkpoint_every",
             "eval_batch_size", "data.threads", "data.cache_dir", "profile_steps")
_IDENTITY = ("method", "arch", "num_classes", "dataset")


def _flat(tree, prefix=""):
  """`{"a": {"b": 1}}` -> `{"a.b": 1}` (JSON values: tuples are lists)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


# Fields added after runs were recorded without them: the value that describes how
# those runs trained (a resumed one then says so, e.g. --config.head_init=lecun).
LEGACY = {"head_init": "lecun", "bituning.ce_weight": 1.0, "bituning.cce_weight": 1.0,
          "bituning.ccl_weight": 1.0, "bituning.key_generation": "momentum",
          "bituning.bank_momentum": 0.5, "delta.feature_maps": "stage_output"}


def config_changes(config, workdir):
  """`{field: (recorded, now)}` between `workdir/config.json` (in today's shape:
  `config_base.stored`) and `config`."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return {}
  saved = _flat(config_base.stored(json.loads(path.read_text())))
  now = _flat(json.loads(config.to_json_best_effort()))
  for field, value in LEGACY.items():
    if field in now:  # (a method's own section: absent from the others' configs)
      saved.setdefault(field, value)
  return {k: (saved.get(k), now.get(k)) for k in sorted(saved.keys() | now.keys())
          if saved.get(k) != now.get(k)}


def _check_against_workdir(config, workdir, resuming):
  """A workdir holds one experiment. Another method, arch, class count or dataset is
  always refused; a resumed run may change only `RESUMABLE` fields. Returns the
  changes (to be recorded once setup has succeeded)."""
  changes = config_changes(config, workdir)
  for key in _IDENTITY:
    if key in changes:
      raise ValueError(f"{workdir} holds a run with {key}={changes[key][0]!r}, but the "
                       f"config says {changes[key][1]!r}; use another --workdir")
  refused = [k for k in changes if k not in RESUMABLE]
  if resuming and refused:
    listed = ", ".join(f"{k}={changes[k][0]!r} (now {changes[k][1]!r})" for k in refused)
    raise ValueError(
        f"{workdir} holds a checkpointed run trained with {listed}. A resumed run may "
        f"change only {', '.join(RESUMABLE)}: give the recorded values, or use "
        "another --workdir")
  return changes


def _record_config(config, workdir, step, changes):
  """`config.json` is the config the run trains under now; `launches/` keeps every
  launch's config with the step it started from. Written after a successful setup."""
  if jax.process_index() != 0:
    return
  root = epath.Path(workdir)
  launches = root / "launches"
  launches.mkdir(parents=True, exist_ok=True)
  number = len(list(launches.glob("launch-*.json")))
  record = {"start_step": step, "changes": {k: list(v) for k, v in changes.items()},
            "config": json.loads(config.to_json_best_effort())}
  files.write_atomically(launches / f"launch-{number:03d}.json",
                         json.dumps(record, indent=2))
  files.write_atomically(root / "config.json", config.to_json_best_effort(indent=2))
  if changes and step > 0:
    log.info("resumed at step %d with changes: %s", step, ", ".join(
        f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))


def _load_pretrained(config, workdir):
  """The converted checkpoint named by `config.init_from` (None if empty)."""
  if not config.init_from or config.init_from == "none":
    if not config.init_from and config.dataset != "digits":
      log.warning("no init_from: %s starts from RANDOM weights on %s. Give a "
                  "bitune-convert output (--config.init_from=FILE.npz), or "
                  "--config.init_from=none to say that this is meant.", config.method,
                  config.dataset)
    return None
  path = config.init_from
  if path == "demo:digits_source":
    path = _demo_pretrained(config, workdir)
  pretrained = convert.load_converted(path)
  if pretrained["report"]["arch"] != config.arch:
    raise ValueError(f"init_from {path} is a {pretrained['report']['arch']} checkpoint; "
                     f"the config's arch is {config.arch}")
  pretrained["path"], pretrained["sha256"] = path, convert.sha256_of(path)
  return pretrained


def _with_pretrained(state, pretrained, shardings):
  """Copies the pretrained backbone into the query (and key) encoders."""
  params = dict(state.params, backbone=pretrained["backbone"]["params"])
  if "source_head" in state.params:  # the pre-trained classifier (Co-Tuning)
    params["source_head"] = pretrained["source_head"]
  stats = dict(state.batch_stats, backbone=pretrained["backbone"]["batch_stats"])
  new = state.replace(params=params, batch_stats=stats)
  if state.key_params:  # the key encoder starts as a copy (its own buffers: donated)
    new = new.replace(key_params=jax.tree.map(np.array, params),
                      key_batch_stats=jax.tree.map(np.array, stats))
  try:
    return jax.device_put(new, shardings)
  except ValueError as e:
    raise ValueError(f"pretrained backbone does not fit the model: {e}") from None


def create_state(config, method, model, tx, mesh, data, workdir, ckpts):
  sample = jnp.zeros((1,) + tuple(data.image_shape), jnp.float32)
  extra = method.init_data(config, data) if hasattr(method, "init_data") else {}
  init = functools.partial(method.init_state, sample_images=sample, model=model, tx=tx,
                           config=config, **extra)
  # Parameters are replicated, so partitioning their random draws gains nothing, and
  # partitionable threefry makes the init compile ~4x slower (19 s vs 5 s for the demo).
  # Both traces (shapes, then values) under the same setting: one init, any process.
  with jax.threefry_partitionable(False):
    abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  shardings = method.state_shardings(abstract, mesh, config)
  restored = None if ckpts is None else ckpts.restore(abstract, shardings)
  if restored is not None:
    log.info("resumed from %s at step %d", ckpts.directory, int(restored.step))
    return restored, shardings
  pretrained = _load_pretrained(config, workdir)
  if hasattr(method, "check_pretrained"):  # before anything compiles
    method.check_pretrained(pretrained, config)
  with jax.threefry_partitionable(False):
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  if pretrained is not None:
    state = _with_pretrained(state, pretrained, shardings)
    log.info("initialised the backbone from %s", config.init_from)
  if hasattr(method, "prepare"):  # e.g. Co-Tuning's relationship, from the data
    state = method.prepare(state, model=model, config=config, data=data, mesh=mesh,
                           workdir=workdir, pretrained=pretrained)
    state = jax.device_put(state, shardings)
  return state, shardings


# --------------------------------------------------------------------------- eval
def extract_features(run, state, split, *, batch_size, mesh):
  """Eval-mode pooled backbone features `[N, F]` of a split, and their labels `[N]`."""
  return common.eval_outputs(run.model, state, split, output="features",
                             batch_size=batch_size, mesh=mesh)


def feature_eval(run, state, config, mesh, split=None):
  """The feature protocols: retrieval top-5 (`split`, default test, against train),
  k-means BCubed precision and a linear probe, on eval-mode backbone features."""
  (train_f, train_y), (test_f, test_y) = (
      extract_features(run, state, s, batch_size=config.eval_batch_size, mesh=mesh)
      for s in (run.data.train, split or run.data.test))
  return evaluate.feature_metrics(train_f, train_y, test_f, test_y,
                                  num_classes=config.num_classes)


def run_eval(run, state, config, mesh, split=None):
  """Top-1 and mean per-class accuracy of the classifier on `split` (default: test),
  and `score`, the dataset's headline metric (`Input.metric`); for methods trained
  without labels (`FEATURE_EVAL`), the feature protocols instead."""
  if getattr(run.method, "FEATURE_EVAL", False):
    return feature_eval(run, state, config, mesh, split)
  outputs = []
  for batch in (split or run.data.test).batches(config.eval_batch_size):
    outputs.append(jax.device_get(run.eval_step(state,
                                                sharding.global_batch(batch, mesh))))
  pred, labels, mask = (np.concatenate(x) for x in zip(*outputs))
  metrics = evaluate.classification_metrics(pred, labels, mask, config.num_classes)
  return dict(metrics, score=metrics[run.data.metric])


# --------------------------------------------------------------------------- loop
@dataclasses.dataclass
class Setup:
  """Everything a run needs, built once: the loop and the tests share it."""
  method: Any
  data: Any  # bitune_jax.data.input.Input
  model: Any
  state: Any
  state_shardings: Any
  train_step: Any  # jitted, state donated
  eval_step: Any
  config_changes: dict = dataclasses.field(default_factory=dict)  # vs config.json
  method_step: Any = None  # the method's step on views (float images), not jitted


def setup(config, mesh, workdir=None, ckpts=None):
  """Validates the config, loads the data, builds (or restores) the sharded state and
  jits the steps. Every config error is raised before anything is compiled."""
  config_base.finalize(config)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh)
  method = methods.get(config.method)
  data = input_lib.load(config, methods.data_needs(config))
  if data.num_classes != config.num_classes:
    raise ValueError(f"num_classes={config.num_classes} but dataset {config.dataset!r} "
                     f"has {data.num_classes} classes")
  changes = {}
  if workdir is not None:
    resuming = ckpts is not None and ckpts.latest_step() is not None
    changes = _check_against_workdir(config, workdir, resuming)
  model = method.build_model(config, config.num_classes)
  tx = common.make_optimizer(config)
  state, shardings = create_state(config, method, model, tx, mesh, data, workdir, ckpts)
  common.log_learning_rates(config, state.params)
  rep = sharding.replicated(mesh)
  method_step = method.make_train_step(model, tx, config)
  train_step = jax.jit(with_views(method_step, data.views),
                       in_shardings=(shardings, None), out_shardings=(shardings, rep),
                       donate_argnums=0,
                       compiler_options=queues.inplace_update_compiler_options())
  eval_step = jax.jit(common.EvalStep(model), out_shardings=rep)
  return Setup(method, data, model, state, shardings, train_step, eval_step, changes,
               method_step)


def train_and_evaluate(config, workdir):
  """Trains, evaluates and checkpoints; returns `(state, summary)`."""
  config_base.finalize(config)  # a bad value refused before anything is written
  workdir_lock.check_workdir(workdir)
  sharding.initialize_multihost(config.multi_host)
  mesh = sharding.make_mesh()
  created = _missing_folders(workdir)
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    run = setup(config, mesh, workdir, ckpts)
  except BaseException:
    ckpts.close()
    _remove_if_empty(created)  # a failed start leaves nothing behind
    raise
  summary_path = epath.Path(workdir) / "summary.json"
  if int(run.state.step) >= config.total_steps and summary_path.exists():
    # A finished run, nothing to train: its records (config.json, launches/, the
    # events files, summary.json) stay as they are.
    ckpts.close()
    log.info("%s finished at step %d: nothing to do, its records kept as they are "
             "(raise --config.total_steps to train on)", workdir, int(run.state.step))
    return run.state, json.loads(summary_path.read_text())
  _record_config(config, workdir, int(run.state.step), run.config_changes)
  # clu imports TensorFlow: imported where the loop uses it, so that the steps and views
  # of this module import without it (bench/device.sh on a machine without TensorFlow).
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps,
                                             writer=writer)
  return _loop(config, workdir, run, mesh, ckpts, writer, progress)


def _missing_folders(workdir):
  """The local folders a run would create (the workdir and its checkpoint folders)."""
  if "://" in str(workdir):
    return []
  paths = [os.path.join(workdir, "checkpoints"), os.path.join(workdir, "best")]
  return ([p for p in paths if not os.path.exists(p)]
          + workdir_lock.missing_folders(os.path.abspath(workdir)))


def _remove_if_empty(folders):
  if jax.process_index() != 0:
    return
  for folder in sorted(folders, key=len, reverse=True):  # children first
    if os.path.isdir(folder) and not os.listdir(folder):
      os.rmdir(folder)


def _loop(config, workdir, run, mesh, ckpts, writer, progress):
  state, train_step = run.state, run.train_step
  first = int(state.step)
  total = config.total_steps
  summary_path = epath.Path(workdir) / "summary.json"
  metrics, eval_metrics, start = None, {}, time.perf_counter()
  profiler = _Profiler(workdir, first, config.get("profile_steps", 0))
  signals = stopping.StopSignals()  # SIGTERM (preemption), Ctrl-C: save, then stop
  try:
    signals.install()
    for step, batch in zip(range(first + 1, total + 1),
                           _train_batches(run, mesh, first)):
      profiler.before(step)
      state, metrics = train_step(state, batch)
      profiler.after(step, state)
      progress(step)
      if step == first + 1:  # it compiled the step: the rate counts from its end
        jax.block_until_ready(state.step)
        compiled, start = time.perf_counter() - start, time.perf_counter()
      checkpointing = step % config.checkpoint_every == 0 or step == total
      if step % config.log_every == 0 or checkpointing:
        metrics = jax.device_get(metrics)
        _stop_if_not_finite(metrics, step, ckpts)
        writer.write_scalars(step, dict(
            metrics, **common.learning_rates(config, state.params, step - 1)))
        if step == first + 1:
          log.info("step %d/%d  loss %.4f  (compiling and the first step: %.0f s)", step,
                   total, metrics["loss"], compiled)
        else:
          rate = (step - first - 1) / (time.perf_counter() - start)
          log.info("step %d/%d  loss %.4f  %.1f steps/s  ETA %.0f s", step, total,
                   metrics["loss"], rate, (total - step) / rate)
      if step % config.eval_every == 0 or step == total:
        eval_metrics = run_eval(run, state, config, mesh)
        writer.write_scalars(step, {f"test_{k}": v for k, v in eval_metrics.items()})
        log.info("step %d  test %s", step,
                 "  ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
        selection = eval_metrics  # the best checkpoint: by validation score if held out
        if run.data.val is not None:
          selection = run_eval(run, state, config, mesh, run.data.val)
          writer.write_scalars(step, {f"val_{k}": v for k, v in selection.items()})
          log.info("step %d  validation score %.4f", step, checkpoint.score(selection))
        ckpts.save_best(step, state, selection)
      stop = signals.should_stop(step)  # asked of every process at every step
      if checkpointing or stop:
        ckpts.save(step, state)
      if stop and step < total:  # every process stops at this same step
        raise stopping.Stopped(step, signals.signum, ckpts.directory)
    if not eval_metrics:  # resumed at the end, or 0 steps: evaluate what there is
      eval_metrics = run_eval(run, state, config, mesh)
    if total == 0 and ckpts.latest_step() is None:  # the initial state, as it is
      ckpts.save(0, state)
    best_step = ckpts.best_step()
  finally:
    signals.restore()
    profiler.stop()
    ckpts.close()
    writer.flush()
  # The headline: the final checkpoint's test metrics. The best checkpoint (best/) is
  # named by how it was chosen: on the held-out validation split, or on the test split
  # (which flatters it).
  summary = {"step": int(state.step), "method": config.method, "arch": config.arch,
             "dataset": config.dataset, "sampling_rate": config.sampling_rate,
             "metric": run.data.metric,
             "train_loss": None if metrics is None else float(metrics["loss"]),
             **eval_metrics,
             "best_checkpoint": {"step": best_step,
                                 "chosen_on": "test" if run.data.val is None
                                              else "validation"}}
  files.write_once(summary_path, json.dumps(summary, indent=2))
  return state, summary


class _Profiler:
  """A `jax.profiler` trace of `count` steps into the workdir (TensorBoard's profile
  tab), starting two steps after the first so that compilation is not in it."""

  def __init__(self, workdir, first, count):
    self.start, self.stop_at = first + 3, first + 2 + count
    self.workdir, self.count, self.running = workdir, count, False

  def before(self, step):
    if self.count and step == self.start:
      jax.profiler.start_trace(str(self.workdir))
      self.running = True

  def after(self, step, state):
    if self.running and step == self.stop_at:
      jax.block_until_ready(state)
      self.stop()
      log.info("profile of steps %d-%d written to %s (tensorboard --logdir)",
               self.start, self.stop_at, self.workdir)

  def stop(self):
    if self.running:
      jax.profiler.stop_trace()
      self.running = False


def _stop_if_not_finite(metrics, step, ckpts):
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    last = ckpts.latest_step()
    kept = (f"The last good checkpoint (step {last}) is kept in {ckpts.directory}."
            if last is not None else "There is no checkpoint yet: nothing was saved.")
    raise FloatingPointError(f"loss is {loss} at step {step}: training stopped. {kept}")


# --------------------------------------------------------------------------- demo
def demo_source_file(workdir):
  """Where `_demo_pretrained(config, workdir)` writes the demo's source model."""
  return os.path.join(workdir, "pretrained", "digits_source.npz")


def _demo_pretrained(config, workdir):
  """Supervised pre-training on digits 0-4 by this pipeline, exported like a converted
  checkpoint (once per workdir), so the demo enters through the same init path."""
  path = demo_source_file(workdir)
  if os.path.exists(path):  # written by process 0 of an earlier start (whole)
    return path
  # One source model whatever fine-tunes it, as a real checkpoint: vanilla
  # fine-tuning's demo config, taking from the run only its arch, image size, seed,
  # the pre-training's length and rate, and how it reports and caches (not, e.g.,
  # unsupervised fine-tuning's MoCo views or FixMatch's k-shot subset).
  from bitune_jax.configs import finetune as finetune_config  # pylint: disable=g-import-not-at-top
  pre = finetune_config.get_config("demo")
  with pre.unlocked():
    for field in ("arch", "image_size", "seed", "eval_batch_size", "log_every",
                  "eval_every", "checkpoint_every", "multi_host"):
      pre[field] = config[field]
    for field in ("cache_dir", "threads"):
      pre.data[field] = config.data.get(field, pre.data[field])
    pre.init_from, pre.data.part = "", "source"
    pre.total_steps, pre.lr = config.pretrain.total_steps, config.pretrain.lr
    pre.lr_mult = {g: 1.0 for g in common.GROUPS}
  log.info("demo: supervised pre-training on digits 0-4 (%d steps)", pre.total_steps)
  state, summary = train_and_evaluate(pre, os.path.join(workdir, "pretrain"))
  log.info("demo: source model test top-1 %.4f", summary["top1"])
  params, stats = jax.device_get((state.params, state.batch_stats))
  result = {"backbone": {"params": params["backbone"], "batch_stats": stats["backbone"]},
            "source_head": dict(params["head"]["dense"]),
            "report": {"format": "bitune_jax", "arch": config.arch,
                       "kind": "supervised", "notes": [f"digits 0-4, {summary}"],
                       "dropped": []}}
  if jax.process_index() == 0:  # one writer; the others wait for it, then read it
    os.makedirs(os.path.dirname(path), exist_ok=True)
    convert.save_converted(result, path, source="digits 0-4 pre-training")
  files.sync("demo source model written")
  return path
