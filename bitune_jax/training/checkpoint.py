"""Orbax checkpoints of the train state: the latest two (async, for resume) and the
best by the selection metric. Restores onto `ShapeDtypeStruct`s that carry the state's
shardings, so a checkpoint written by any number of processes restores on any other.

A checkpoint is written to a temporary folder and renamed when complete, so a process
killed while writing leaves the previous ones intact (the temporary folder is removed at
the next start); a checkpoint that cannot be read is reported and the one before it is
used.
"""

import functools
import logging
import os

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("bitune_jax")


def score(metrics):
  """The dataset's headline metric (`score`: top-1 or mean per-class accuracy), or the
  linear probe's top-1 for methods trained without labels."""
  return metrics.get("score", metrics.get("top1", metrics.get("linear_probe_top1", 0.0)))


def _options(name, **kwargs):
  # Each manager its own barrier names: both save the same step from every process.
  return ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=name), **kwargs)


@functools.cache  # once a process
def _write_replicated_arrays_whole_on_cpu():
  """On CPU, a replicated array is written whole by its first replica, not in slices
  across the replicas (Orbax's replica-parallel default, which pays off where devices
  are many hosts' accelerators): on simulated CPU devices each slice is a small device
  transfer of its own, and slicing cost a tiny run's checkpoints 14 s of its 77 s. The
  files are the same. (Orbax keeps its array handler in a process-wide registry.)"""
  if jax.default_backend() != "cpu":
    return
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # not Orbax's "overriding" warning
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
        override=True)
  finally:
    absl_logging.set_verbosity(verbosity)


class Checkpoints:
  """`workdir/checkpoints` (the latest two) and `workdir/best` (highest `score`)."""

  def __init__(self, workdir):
    _write_replicated_arrays_whole_on_cpu()
    workdir = workdir if "://" in str(workdir) else os.path.abspath(workdir)
    self.directory = os.path.join(workdir, "checkpoints")
    self._latest = ocp.CheckpointManager(self.directory,
                                         options=_options("latest", max_to_keep=2))
    self._best = ocp.CheckpointManager(
        os.path.join(workdir, "best"),
        options=_options("best", max_to_keep=1, best_fn=score, best_mode="max"))
    for manager in (self._latest, self._best):
      # Orbax removes the temporary folders of unfinished saves in a thread: finish it
      # now, so that the folders are clean before a restore, and a failed start can
      # remove the folders it made without the thread tripping over them.
      cleanup = getattr(manager, "_cleanup_tmp_directory_future", None)
      if cleanup is not None:
        cleanup.result()

  def latest_step(self):
    return self._latest.latest_step()

  def best_step(self):
    """The step of the best checkpoint, or None."""
    return self._best.best_step()

  def restore(self, abstract_state, shardings, which="latest"):
    """The latest (or best) state, placed with `shardings`; None when there is none."""
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, shardings)
    if which != "latest":
      step = self._best.best_step()
      return None if step is None else self._best.restore(
          step, args=ocp.args.StandardRestore(target))
    steps = sorted(self._latest.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        return self._latest.restore(step, args=ocp.args.StandardRestore(target))
      except ValueError:
        raise  # the checkpoint is sound but holds another run (a changed config)
      except Exception as e:  # pylint: disable=broad-except
        path = os.path.join(self.directory, str(step))
        why = str(e).splitlines()[0].split(" See full TensorStore details")[0]
        why = f"{type(e).__name__}: {why[:200]}"
        if i + 1 == len(steps):
          raise ValueError(f"checkpoint {path} cannot be read ({why}) and there is "
                           "none before it") from e
        aside = self._set_aside(step)
        log.error("checkpoint %s cannot be read (%s); moved to %s, resuming from step "
                  "%d instead", path, why, aside, steps[i + 1])
    return None

  def _set_aside(self, step):
    """Moves an unreadable checkpoint out of the manager's sight (kept, not deleted),
    so that the step is written afresh when the run gets there again."""
    from etils import epath  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    source = epath.Path(self.directory) / str(step)
    aside = epath.Path(self.directory + "-unreadable") / str(step)
    if jax.process_index() == 0:
      aside.parent.mkdir(parents=True, exist_ok=True)
      if aside.exists():
        aside.rmtree()
      source.rename(aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._latest.reload()
    return aside

  def save(self, step, state):
    if step != self._latest.latest_step():
      self._latest.save(step, args=ocp.args.StandardSave(state))

  def save_best(self, step, state, metrics):
    self._best.save(step, args=ocp.args.StandardSave(state), metrics=metrics)

  def close(self):
    for manager in (self._latest, self._best):
      manager.wait_until_finished()
      manager.close()
