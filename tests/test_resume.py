"""Resume is really resume: an interrupted Bi-tuning run restarts at the step of its last
checkpoint (not at 0), runs exactly the remaining steps on the batches of those steps,
and restores the very state that was written; the best checkpoint is the state of the
eval step with the highest score. Checked against the checkpoint files read back with
orbax directly and against host copies of the state taken when it was saved.

A run that silently restarts from step 0 ends in the same final state (training is
deterministic), so these tests look at the steps, the batches and the checkpoints."""

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import fakes
from bitune_jax import methods
from bitune_jax.data import input as input_lib
from bitune_jax.training import checkpoint, loop

TOTAL = 6       # steps of the run
EVERY = 3       # checkpoint interval: the interrupted run's last checkpoint is step 3
STOPPED = 4     # steps the interrupted run completed before it was stopped


def _config():
  return fakes.tiny_config(
      "bituning", total_steps=TOTAL, checkpoint_every=EVERY, log_every=EVERY,
      eval_every=1,  # a best-checkpoint candidate at every step
      bituning={"queue_size": 4})


def _leaves(tree):
  """`{'params/head/dense/kernel': array, ...}` for a TrainState or the dict orbax
  returns when reading a checkpoint without a target (empty nodes dropped)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
  return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
          for path, leaf in flat}


def _assert_same_state(got, expected, what):
  got, expected = _leaves(got), _leaves(expected)
  assert sorted(got) == sorted(expected), (what, sorted(set(got) ^ set(expected)))
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{what}: {name}")


def _read_checkpoint(directory, step):
  """The state saved at `step`, read with orbax alone (no target, no manager)."""
  return ocp.StandardCheckpointer().restore(
      os.path.join(directory, str(step), "default"))


def _steps_on_disk(directory):
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


class _Recorder:
  """Wraps the loop's seams: what was saved (host copies, by step), what setup restored,
  and every call of the jitted train step (the state's step and the batch)."""

  def __init__(self, monkeypatch):
    self.saved, self.saved_best, self.scores, self.calls = {}, {}, {}, []
    self.restored = None
    save, save_best, setup = (checkpoint.Checkpoints.save,
                              checkpoint.Checkpoints.save_best, loop.setup)

    def recording_save(ckpts, step, state):
      self.saved[step] = jax.device_get(state)  # before the next step donates it
      return save(ckpts, step, state)

    def recording_save_best(ckpts, step, state, metrics):
      self.saved_best[step] = jax.device_get(state)
      self.scores.setdefault(step, []).append(float(metrics["score"]))
      return save_best(ckpts, step, state, metrics)

    def recording_setup(*args, **kwargs):
      run = setup(*args, **kwargs)
      self.restored = dict(state=jax.device_get(run.state), step=int(run.state.step),
                           abstract=jax.eval_shape(lambda s: s, run.state),
                           shardings=run.state_shardings)
      step_fn = run.train_step

      def counting_step(state, batch):
        self.calls.append(dict(step=int(state.step), batch=jax.device_get(batch)))
        return step_fn(state, batch)
      return dataclasses.replace(run, train_step=counting_step)

    monkeypatch.setattr(checkpoint.Checkpoints, "save", recording_save)
    monkeypatch.setattr(checkpoint.Checkpoints, "save_best", recording_save_best)
    monkeypatch.setattr(loop, "setup", recording_setup)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
  """Runs `TOTAL` steps, stopped after `STOPPED` (last checkpoint at `EVERY`), then
  resumed in the same workdir. Returns what both runs recorded and the files read back
  between them."""
  workdir = str(tmp_path_factory.mktemp("resume") / "run")
  config = _config()
  real_batches = loop.train_batches

  def stop_after(run, mesh, start_step):
    for step, batch in enumerate(real_batches(run, mesh, start_step), start_step):
      if step == STOPPED:  # 0-based: the batch of step STOPPED + 1
        raise KeyboardInterrupt(f"stopped before step {STOPPED + 1}")
      yield batch

  with pytest.MonkeyPatch.context() as mp:
    first = _Recorder(mp)
    mp.setattr(loop, "train_batches", stop_after)
    with pytest.raises(KeyboardInterrupt, match=f"stopped before step {STOPPED + 1}"):
      loop.train_and_evaluate(config, workdir)
  latest_dir = os.path.join(workdir, "checkpoints")
  on_disk = dict(latest=_steps_on_disk(latest_dir),
                 best=_steps_on_disk(os.path.join(workdir, "best")))
  written = {s: _read_checkpoint(latest_dir, s) for s in on_disk["latest"]}
  with pytest.MonkeyPatch.context() as mp:
    second = _Recorder(mp)
    final, summary = loop.train_and_evaluate(config, workdir)
  return dict(config=config, workdir=workdir, first=first, second=second,
              on_disk=on_disk, written=written, final=jax.device_get(final),
              summary=summary)


def test_interrupted_run_left_the_step_3_checkpoint(resumed_run):
  first = resumed_run["first"]
  assert [c["step"] for c in first.calls] == list(range(STOPPED)), first.calls
  assert first.restored["step"] == 0  # a fresh workdir starts at 0
  assert resumed_run["on_disk"]["latest"] == [EVERY], resumed_run["on_disk"]
  assert sorted(first.saved) == [EVERY]
  # The file holds the state as it was at step 3 (host copy taken at save time).
  _assert_same_state(resumed_run["written"][EVERY], first.saved[EVERY],
                     "checkpoint file vs state at save")
  assert int(resumed_run["written"][EVERY]["step"]) == EVERY


def test_setup_restores_step_s_and_the_saved_state(resumed_run):
  restored = resumed_run["second"].restored
  assert restored["step"] == EVERY, f"resumed at step {restored['step']}, not {EVERY}"
  # Leaf by leaf (params, EMA params, BN statistics, queues, optimizer, rng) against
  # the step-3 checkpoint as orbax reads it from the files.
  _assert_same_state(restored["state"], resumed_run["written"][EVERY],
                     "restored state vs step-3 checkpoint file")
  # Not the fresh initial state: a restart from scratch would differ here.
  start = resumed_run["first"].restored["state"]
  assert not np.array_equal(restored["state"].params["head"]["dense"]["kernel"],
                            start.params["head"]["dense"]["kernel"])


def test_only_the_remaining_steps_run_on_their_batches(resumed_run):
  config, second = resumed_run["config"], resumed_run["second"]
  steps = [c["step"] for c in second.calls]
  assert steps == list(range(EVERY, TOTAL)), (
      f"the resumed run stepped from states {steps}; expected {EVERY}..{TOTAL - 1}")
  # The batch stream is a pure function of the step: the first batch consumed after
  # the restart is batch 3 of a fresh stream, and batch 3 is not batch 0.
  data = input_lib.load(config, methods.data_needs(config))
  batch_s, batch_0 = next(data.train_batches(EVERY)), next(data.train_batches(0))
  got = second.calls[0]["batch"]
  assert sorted(got) == sorted(batch_s)
  for key in batch_s:
    np.testing.assert_array_equal(got[key], batch_s[key], err_msg=key)
  assert not np.array_equal(batch_s["image_u8"], batch_0["image_u8"])
  # The first run's batch of step 4 was the same batch 3 (the lost step is redone).
  for key in batch_s:
    np.testing.assert_array_equal(resumed_run["first"].calls[EVERY]["batch"][key],
                                  batch_s[key], err_msg=key)
  assert resumed_run["summary"]["step"] == TOTAL
  assert int(resumed_run["final"].step) == TOTAL
  _assert_same_state(resumed_run["final"], second.saved[TOTAL], "final vs last save")


def test_best_checkpoint_is_the_state_of_the_best_eval_step(resumed_run):
  first, second = resumed_run["first"], resumed_run["second"]
  scores = {}
  for rec in (first, second):
    for step, values in rec.scores.items():
      scores.setdefault(step, []).extend(values)
  assert sorted(scores) == list(range(1, TOTAL + 1)), scores
  for step, values in scores.items():  # step 4 was evaluated by both runs
    assert len(set(values)) == 1, (step, values)
  scores = {step: values[0] for step, values in scores.items()}
  best = max(scores, key=scores.get)
  assert list(scores.values()).count(scores[best]) == 1, (
      f"tied best scores {scores}: the expected best step is ambiguous; change the run")
  states = {**first.saved_best, **second.saved_best}
  # On disk: one best checkpoint, at the best step, with its metrics.
  best_dir = os.path.join(resumed_run["workdir"], "best")
  assert _steps_on_disk(best_dir) == [best], (scores, _steps_on_disk(best_dir))
  with open(os.path.join(best_dir, str(best), "metrics", "metrics")) as f:
    assert json.load(f)["score"] == pytest.approx(scores[best], abs=0), scores
  _assert_same_state(_read_checkpoint(best_dir, best), states[best],
                     f"best checkpoint file vs state at step {best}")
  # Through the library: restore(which="best") gives that state.
  ckpts = checkpoint.Checkpoints(resumed_run["workdir"])
  try:
    restored = second.restored
    got = ckpts.restore(restored["abstract"], restored["shardings"], which="best")
    latest = ckpts.restore(restored["abstract"], restored["shardings"])
  finally:
    ckpts.close()
  assert int(got.step) == best, (int(got.step), scores)
  _assert_same_state(got, states[best], f"restore(which='best') vs state at step {best}")
  assert int(latest.step) == TOTAL
  _assert_same_state(latest, second.saved[TOTAL], "restore() vs state at the last step")
