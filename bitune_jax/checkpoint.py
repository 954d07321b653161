"""Orbax checkpoints of the train state: the latest (async, for resume) and the best
by the dataset's test metric. Restores onto `ShapeDtypeStruct`s that carry the state's shardings."""

import os

import jax
import orbax.checkpoint as ocp


def score(metrics):
  """The dataset's headline metric (`score`: top-1 or mean per-class accuracy), or the
  linear probe's top-1 for methods trained without labels."""
  return metrics.get("score", metrics.get("top1", metrics.get("linear_probe_top1", 0.0)))


class Checkpoints:
  """`workdir/checkpoints` (latest) and `workdir/best` (highest `_score`)."""

  def __init__(self, workdir):
    workdir = workdir if "://" in str(workdir) else os.path.abspath(workdir)
    self.directory = os.path.join(workdir, "checkpoints")
    self._latest = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=True))
    self._best = ocp.CheckpointManager(
        os.path.join(workdir, "best"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=score, best_mode="max",
            enable_async_checkpointing=True))

  def latest_step(self):
    return self._latest.latest_step()

  def best_step(self):
    """The step of the best checkpoint, or None."""
    return self._best.best_step()

  def restore(self, abstract_state, shardings, which="latest"):
    """The latest (or best) state, placed with `shardings`; None when there is none."""
    manager = self._latest if which == "latest" else self._best
    step = manager.latest_step() if which == "latest" else manager.best_step()
    if step is None:
      return None
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, shardings)
    return manager.restore(step, args=ocp.args.StandardRestore(target))

  def save(self, step, state):
    if step != self._latest.latest_step():
      self._latest.save(step, args=ocp.args.StandardSave(state))

  def save_best(self, step, state, metrics):
    self._best.save(step, args=ocp.args.StandardSave(state), metrics=metrics)

  def close(self):
    for manager in (self._latest, self._best):
      manager.wait_until_finished()
      manager.close()
