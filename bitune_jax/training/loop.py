"""The training loop: config -> sharded state -> jitted step -> metrics, eval, checkpoints.

Knows no method math: a method (`bitune_jax.methods`) gives the model, the state and
the step. Resume order: the workdir's own checkpoint, then `config.init_from` (a
bitune-convert output), then random initialisation (`training.state`).
"""

import dataclasses
import json
import logging
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from bitune_jax import files, methods, queues, sharding
from bitune_jax.training import checkpoint, config_base
from bitune_jax.training import stopping, workdir_lock
from bitune_jax.data import input as input_lib
from bitune_jax.methods import base, common, optimizer
from bitune_jax.training import evaluation, events, profile, records
from bitune_jax.training import state as state_lib

log = logging.getLogger("bitune_jax")

# The checkpoints a workdir holds, by the names bitune-eval and bitune-export share:
# the last one saved, and the one with the best evaluation.
WHICH = ("latest", "best")


def train_batches(run, mesh, start_step):
  """Global training batches from `start_step` on, built ahead of the step."""
  return input_lib.prefetch_to_device(run.data.train_batches(start_step), mesh)


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


def setup(config, mesh, workdir=None, ckpts=None, sources=None):
  """Validates the config, loads the data, builds (or restores) the sharded state and
  jits the steps. Every config error is raised before anything is compiled."""
  config_base.finalize(config)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh)
  method = methods.get(config.method)
  data = input_lib.load(config, method.needs(config))
  if data.num_classes != config.num_classes:
    raise ValueError(f"num_classes={config.num_classes} but dataset {config.dataset!r} "
                     f"has {data.num_classes} classes")
  changes = {}
  if workdir is not None:
    resuming = ckpts is not None and ckpts.latest_step() is not None
    changes = records.check_against_workdir(config, workdir, resuming)
  model = method.build_model(config, config.num_classes)
  tx = optimizer.make_optimizer(config)
  state, shardings = state_lib.create_state(config, method, model, tx, mesh, data,
                                            workdir, ckpts, sources)
  optimizer.log_learning_rates(config, state.params)
  rep = sharding.replicated(mesh)
  method_step = base.make_train_step(method, model, tx, config)
  train_step = jax.jit(base.with_views(method_step, data.views),
                       in_shardings=(shardings, None), out_shardings=(shardings, rep),
                       donate_argnums=0,
                       compiler_options=queues.inplace_update_compiler_options())
  eval_step = jax.jit(common.EvalStep(model), out_shardings=rep)
  return Setup(method, data, model, state, shardings, train_step, eval_step, changes,
               method_step)


def train_and_evaluate(config, workdir, sources=None):
  """Trains, evaluates and checkpoints; returns `(state, summary)`. `sources`: the
  `init_from` names made on demand (`training.state.Sources`)."""
  config_base.finalize(config)  # a bad value refused before anything is written
  workdir_lock.check_workdir(workdir)
  sharding.initialize_multihost(config.multi_host)
  mesh = sharding.make_mesh()
  created = records.missing_folders(workdir)
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    run = setup(config, mesh, workdir, ckpts, sources)
  except BaseException:
    ckpts.close()
    records.remove_if_empty(created)  # a failed start leaves nothing behind
    raise
  summary_path = epath.Path(workdir) / "summary.json"
  if int(run.state.step) >= config.total_steps and summary_path.exists():
    # A finished run, nothing to train: its records (config.json, launches/, the
    # events files, summary.json) stay as they are.
    ckpts.close()
    log.info("%s finished at step %d: nothing to do, its records kept as they are "
             "(raise --config.total_steps to train on)", workdir, int(run.state.step))
    return run.state, json.loads(summary_path.read_text())
  records.record_config(config, workdir, int(run.state.step), run.config_changes)
  writer = events.writer(workdir, write=jax.process_index() == 0)
  return _loop(config, workdir, run, mesh, ckpts, writer)


def _loop(config, workdir, run, mesh, ckpts, writer):
  state, train_step = run.state, run.train_step
  first = int(state.step)
  total = config.total_steps
  summary_path = epath.Path(workdir) / "summary.json"
  metrics, eval_metrics, start = None, {}, time.perf_counter()
  profiler = profile.Profiler(workdir, first, config.profile_steps)
  signals = stopping.StopSignals()  # SIGTERM (preemption), Ctrl-C: save, then stop
  try:
    signals.install()
    for step, batch in zip(range(first + 1, total + 1),
                           train_batches(run, mesh, first)):
      state, metrics = train_step(state, batch)
      profiler.after(step, state)
      if step == first + 1:  # it compiled the step: the rate counts from its end
        jax.block_until_ready(state.step)
        compiled, start = time.perf_counter() - start, time.perf_counter()
      checkpointing = step % config.checkpoint_every == 0 or step == total
      if step % config.log_every == 0 or checkpointing:
        metrics = jax.device_get(metrics)
        _stop_if_not_finite(metrics, step, ckpts)
        writer.write_scalars(step, dict(
            metrics, **optimizer.learning_rates(config, state.params, step - 1)))
        if step == first + 1:
          log.info("step %d/%d  loss %.4f  (compiling and the first step: %.0f s)", step,
                   total, metrics["loss"], compiled)
        else:
          rate = (step - first - 1) / (time.perf_counter() - start)
          log.info("step %d/%d  loss %.4f  %.1f steps/s  ETA %.0f s", step, total,
                   metrics["loss"], rate, (total - step) / rate)
      if step % config.eval_every == 0 or step == total:
        eval_metrics = evaluation.run_eval(run, state, config, mesh)
        writer.write_scalars(step, {f"test_{k}": v for k, v in eval_metrics.items()})
        log.info("step %d  test %s", step,
                 "  ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
        selection = eval_metrics  # the best checkpoint: by validation score if held out
        if run.data.val is not None:
          selection = evaluation.run_eval(run, state, config, mesh, run.data.val)
          writer.write_scalars(step, {f"val_{k}": v for k, v in selection.items()})
          log.info("step %d  validation score %.4f", step, checkpoint.score(selection))
        ckpts.save_best(step, state, selection)
      stop = signals.should_stop(step)  # asked of every process at every step
      if checkpointing or stop:
        ckpts.save(step, state)
      if stop and step < total:  # every process stops at this same step
        raise stopping.Stopped(step, signals.signum, ckpts.directory)
    if not eval_metrics:  # resumed at the end, or 0 steps: evaluate what there is
      eval_metrics = evaluation.run_eval(run, state, config, mesh)
    if total == 0 and ckpts.latest_step() is None:  # the initial state, as it is
      ckpts.save(0, state)
    best_step = ckpts.best_step()
  finally:
    signals.restore()
    profiler.stop()
    ckpts.close()
    writer.close()
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


def _stop_if_not_finite(metrics, step, ckpts):
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    last = ckpts.latest_step()
    kept = (f"The last good checkpoint (step {last}) is kept in {ckpts.directory}."
            if last is not None else "There is no checkpoint yet: nothing was saved.")
    raise FloatingPointError(f"loss is {loss} at step {step}: training stopped. {kept}")


def restore(workdir, config, which):
  """The `which` ('latest' or 'best') checkpoint of a run: `(run, state, mesh)`."""
  if which not in WHICH:
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  mesh = sharding.make_mesh()
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    if ckpts.latest_step() is None:
      raise ValueError(f"no checkpoint in {ckpts.directory}")
    run = setup(config, mesh, workdir, ckpts)
    state = run.state
    if which == "best":
      state = ckpts.restore(jax.eval_shape(lambda: state), run.state_shardings, "best")
      if state is None:
        raise ValueError(f"{workdir} has no best checkpoint (no evaluation was saved)")
  finally:
    ckpts.close()
  return run, state, mesh
