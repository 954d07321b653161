"""Several processes, for real: `bitune-train` launched as 2 processes x 2 CPU devices
(jax.distributed over localhost, gloo collectives) against 1 process x 4 devices, on the
digits demo from one converted checkpoint; SIGTERM (preemption), Ctrl-C and kill -9
survived.

Every run here is a real process, the 1-process reference too. Numbers are compared step
by step from their TensorBoard scalars, and final states leaf by leaf.

2 x 2 devices, not 2 x 4: each process still has several devices (a process's slice of
the batch and of the queues spans more than one), and a step costs 10x less. On this
project's 2-core machine a Bi-tuning step of 2 processes x 4 devices took 2.25 CPU s
(most of it in the kernel: 8 simulated devices' gloo collectives on 2 cores), of 2 x 2
0.3 s (10 steps more: +22.5 and +3.1 CPU s, measured 2026-12-07).
"""

import json
import os
import re
import shutil
import signal

import numpy as np
import pytest

import processes
from bitune_jax.training import loop, stopping
from bitune_jax.experiments import demo


TOTAL = 8
# The runs are short and their numbers stable: training starts from a pre-trained
# (converted) checkpoint, as fine-tuning does. From random weights at a high rate the
# same float differences grow chaotically within a few steps.
BASE = {"image_size": 16, "batch_size": 16, "eval_batch_size": 64,
        "total_steps": TOTAL, "log_every": 1, "eval_every": 4, "checkpoint_every": 3}
CONFIG_FILES = {"bituning": "bituning.py:demo", "cotuning": "cotuning.py:demo",
                "unsup_finetune": "unsup_finetune.py:demo"}
LOSSES = {"bituning": ("loss", "ce", "cce", "ccl"), "cotuning": ("loss", "ce", "co_tuning"),
          "unsup_finetune": ("loss",)}
# 2 x 2 devices against 1 x 4: the same sums in another order, their float32 rounding
# grown over the steps (measured: 1.1e-5 on Bi-tuning's CE over 8 steps, 9.1e-7 on
# Co-Tuning's terms over 4).
LAYOUT_RTOL = 5e-5


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A converted checkpoint (a few steps of supervised pre-training on digits 0-4, in
  the converter's format): every run here starts from it."""
  import importlib  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp("source")
  config = importlib.import_module("bitune_jax.configs.bituning").get_config("demo")
  config.image_size, config.batch_size, config.eval_batch_size = 16, 16, 64
  config.pretrain.total_steps = 6
  return demo.source_model(config, str(folder))  # pylint: disable=protected-access


def _overrides(source, **more):
  return dict(BASE, init_from=source, **more)


# The layouts: the runs of several processes, and the one they are held to.
TWO = dict(processes_=2, devices=2)
ONE = dict(processes_=1, devices=4)


def _train(method, overrides, workdir, *, processes_, devices, config_file=None):
  return processes.launch(
      processes.config_flags(config_file or CONFIG_FILES[method], overrides)
      + ["--workdir", str(workdir)], str(workdir) + "-logs", processes=processes_,
      devices=devices)


def _reference(method, overrides, workdir, config_file=None):
  """1 process x 4 devices: the run's scalars and summary."""
  run = _train(method, overrides, workdir, config_file=config_file, **ONE)
  assert run.wait() == [0], run.log()[-3000:]
  return processes.scalars(workdir), json.loads((workdir / "summary.json").read_text())


def _assert_same_steps(got, want, tags, steps, rtol):
  for tag in tags:
    for step in steps:
      assert got[tag][step] == pytest.approx(want[tag][step], rel=rtol, abs=1e-7), (
          tag, step)


def _assert_same_eval(got, want, keys):
  """Accuracies (counts over the test set) to 1e-6; a loss, like every step's, to
  LAYOUT_RTOL (measured: 8e-7 relative on Co-Tuning's final train loss)."""
  for key in keys:
    tolerance = dict(rel=LAYOUT_RTOL) if "loss" in key else dict(abs=1e-6)
    assert got[key] == pytest.approx(want[key], **tolerance), key


@pytest.fixture(scope="module")
def bituning_reference(source, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("bituning-1x4") / "run"
  scalars, summary = _reference("bituning", _overrides(source), workdir)
  return workdir, scalars, summary


@pytest.fixture(scope="module")
def bituning_2x2(source, tmp_path_factory):
  """The Bi-tuning run as 2 processes x 2 devices, uninterrupted: one launch for the
  tests that compare against it (checkpoints change no number: a run with periodic
  checkpoints off ends bitwise where this one ends, see the SIGTERM tests)."""
  workdir = tmp_path_factory.mktemp("bituning-2x2") / "run"
  run = _train("bituning", _overrides(source), workdir, **TWO)
  assert run.wait() == [0, 0], run.log(0)[-3000:] + run.log(1)[-3000:]
  return workdir, run


# --------------------------------------------------------------------------- layouts
@pytest.mark.slow
@pytest.mark.parametrize("method", ["bituning", "cotuning", "unsup_finetune"])
def test_two_processes_give_the_numbers_of_one(method, source, bituning_reference,
                                               request, tmp_path):
  """2 processes x 2 devices = 1 x 4: every loss term at every step, the evaluation,
  the final state. Co-Tuning's relationship comes from outputs gathered over both
  processes; unsupervised fine-tuning shuffles BatchNorm groups across them."""
  # Evaluated once, at the end: the final evaluation is what is compared (the shared
  # Bi-tuning runs also evaluate at step 4). Co-Tuning and unsupervised fine-tuning run
  # 4 steps (the relationship, the shuffled BatchNorm groups, the queue are in every
  # step; a 2-process step costs ~2.5 CPU s here).
  steps = TOTAL if method == "bituning" else 4
  overrides = _overrides(source, total_steps=steps, eval_every=steps)
  if method == "bituning":
    ref_dir, want, ref_summary = bituning_reference
    workdir, run = request.getfixturevalue("bituning_2x2")
  else:
    ref_dir, workdir = tmp_path / "1x4", tmp_path / "2x2"
    want, ref_summary = _reference(method, overrides, ref_dir)
    run = _train(method, overrides, workdir, **TWO)
    assert run.wait() == [0, 0], run.log(0)[-3000:] + run.log(1)[-3000:]
  got = processes.scalars(workdir)
  _assert_same_steps(got, want, LOSSES[method], range(1, steps + 1), LAYOUT_RTOL)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == steps
  _assert_same_eval(summary, ref_summary, [k for k, v in ref_summary.items()
                                           if isinstance(v, float)])
  mine, theirs = (processes.final_state(d, steps) for d in (workdir, ref_dir))
  _assert_same_params(mine["params"], theirs["params"], source)
  # One writer: process 0 wrote the records, whole; process 1 printed no summary.
  assert "summary in" in run.log(0) and "summary in" not in run.log(1)
  # Progress from process 0 alone: process 1 does not print the same lines again.
  assert re.search(r"step \d+/\d+", run.log(0)), run.log(0)[-2000:]
  assert not re.search(r"step \d+/\d+|learning rate of", run.log(1)), run.log(1)[-2000:]
  assert len(list((workdir / "launches").glob("launch-*.json"))) == 1
  if method == "bituning":
    # bitune-eval as 2 processes, of the checkpoint that 1 process x 4 devices wrote
    # (elastic restore 1 -> 2; training resumed 2 -> 1 is in the SIGTERM test): the
    # numbers of that run.
    run = processes.launch(["--workdir", str(ref_dir)], str(tmp_path / "eval"),
                           processes=2, devices=2, module="bitune_jax.cli.eval")
    assert run.wait() == [0, 0], run.log(0)[-3000:] + run.log(1)[-3000:]
    record = json.loads((ref_dir / "evals" / f"latest-step{TOTAL}.json").read_text())
    _assert_same_eval(record, ref_summary, ["top1", "mean_class_acc"])
  if method == "cotuning":
    (cache,) = (workdir / "relationship").glob("*.npz")
    (ref_cache,) = (ref_dir / "relationship").glob("*.npz")
    np.testing.assert_allclose(np.load(cache)["relationship"],
                               np.load(ref_cache)["relationship"], atol=1e-6)


@pytest.mark.slow
def test_two_processes_on_a_tfds_dataset_prepared_once(source, tmp_path):
  """Aircraft as tfds builds it from the official archive layout (a fake one): process
  0 prepares it while process 1 waits; 2 x 2 devices then train and evaluate as 1 x 4."""
  import fakes  # pylint: disable=g-import-not-at-top
  archive = fakes.make_fgvc_aircraft(str(tmp_path / "manual"), per_split=1)
  overrides = {"data.manual_dir": archive, "data.data_dir": str(tmp_path / "tfds"),
               "init_from": source, "image_size": 32, "batch_size": 16,
               "eval_batch_size": 64, "total_steps": 3, "log_every": 1}
  config_file = "finetune.py:aircraft,resnet_small,100"
  run = _train("finetune", overrides, tmp_path / "2x2", config_file=config_file, **TWO)
  assert run.wait() == [0, 0], run.log(0)[-3000:] + run.log(1)[-3000:]
  assert "preparing tfds fgvc_aircraft" in run.log(0)
  assert "preparing" not in run.log(1)
  want, want_summary = _reference("finetune", overrides, tmp_path / "1x4", config_file)
  _assert_same_steps(processes.scalars(tmp_path / "2x2"), want, ("loss",), (1, 2, 3),
                     LAYOUT_RTOL)
  summary = json.loads((tmp_path / "2x2" / "summary.json").read_text())
  _assert_same_eval(summary, want_summary, ["top1", "mean_class_acc"])


# After the steps, the layouts' parameters: their float noise (the sums' order; the views
# are made inside each layout's own compiled step) grown over the steps, largest where
# BatchNorm's gradients cancel (the stem). Measured, 2 x 2 against 1 x 4 devices, as a
# fraction of the leaf's largest change since the source model: 7.7e-3 (Bi-tuning, 8
# steps; 3.5e-3 on the stem's kernel, 2e-5 absolute), while an update a layout lost or
# doubled is 1 of it.
UPDATE_RTOL = 2e-2


def _assert_same_params(mine, theirs, source):
  """The backbone's leaves: the same change since `source` (the converted checkpoint
  every run starts from) to UPDATE_RTOL of its largest; the heads (drawn at step 0,
  the same in each layout): to 1e-4 relative, 1e-5 absolute."""
  import jax  # pylint: disable=g-import-not-at-top
  from bitune_jax import convert  # pylint: disable=g-import-not-at-top
  start = convert.load_converted(source)["backbone"]["params"]
  assert jax.tree.structure(mine["backbone"]) == jax.tree.structure(start)
  for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(mine["backbone"]),
                             jax.tree.leaves(theirs["backbone"]), jax.tree.leaves(start)):
    change = np.max(np.abs(b - s))
    assert change > 0, jax.tree_util.keystr(path)
    assert np.max(np.abs(a - b)) <= UPDATE_RTOL * change, (
        jax.tree_util.keystr(path), np.max(np.abs(a - b)), change)
  np.testing.assert_allclose(_flat({k: v for k, v in mine.items() if k != "backbone"}),
                             _flat({k: v for k, v in theirs.items() if k != "backbone"}),
                             rtol=1e-4, atol=1e-5)


def _flat(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


# --------------------------------------------------------------------------- preemption
def _preempt(method, overrides, workdir, *, processes_, devices, target=0, after=2,
             signum=signal.SIGTERM):
  """Starts a run, sends `signum` to process `target` once step `after` is logged, and
  checks that every process stopped at the same step, saved it and said so."""
  run = _train(method, overrides, workdir, processes_=processes_, devices=devices)
  run.wait_for(rf"step {after}/{TOTAL}", i=0)  # process 0 alone prints progress
  run.signal(signum, i=target)
  codes = run.wait(timeout=300)
  assert codes == [128 + signum] * processes_, run.log(0)[-3000:]
  name = re.escape(stopping.NAMES[signum])
  stops = {int(re.search(rf"stopped by {name} at step (\d+); its checkpoint is saved in "
                         r"(\S+); the same command resumes", run.log(i))[1])
           for i in range(processes_)}
  assert len(stops) == 1, stops  # every process at the same step
  (step,) = stops
  assert not (workdir / ".lock").exists()  # released: the next start takes it
  assert after <= step < TOTAL
  # Periodic checkpoints are off in these runs: the one there is the stop's own.
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
  assert not (workdir / "summary.json").exists()
  return step, run


@pytest.mark.slow
def test_ctrl_c_stops_saves_and_resumes_bitwise_one_process(source, bituning_reference,
                                                            tmp_path):
  """One process: Ctrl-C mid-run saves the step it reached (not only the periodic
  checkpoint), says so in one line and exits 130; the same command resumes there and
  ends bitwise equal to the run that was never stopped. (A checkpoint of 1 process
  restored by 2: bitune-eval's in test_two_processes_give_the_numbers_of_one.)
  One process takes SIGTERM through the same handler (tests/test_sweep.py sends it to
  a real loop; test_cli_train.py checks its notice); several processes take it through
  JAX's preemption service: test_sigterm_to_one_of_two_processes."""
  ref_dir, want, _ = bituning_reference
  overrides, workdir = _overrides(source, checkpoint_every=100), tmp_path / "run"
  step, run = _preempt("bituning", overrides, workdir, signum=signal.SIGINT, **ONE)
  assert re.search(rf"^bitune-train: stopped by Ctrl-C \(SIGINT\) at step {step}; its "
                   rf"checkpoint is saved in {workdir}/checkpoints; the same command "
                   "resumes\n", run.log(), re.M), run.log()[-3000:]
  assert "Traceback" not in run.log()
  run = _train("bituning", overrides, workdir, **ONE)
  assert run.wait() == [0], run.log()[-3000:]
  assert f"resumed from {workdir}/checkpoints at step {step}" in run.log()
  assert json.loads((workdir / "summary.json").read_text())["step"] == TOTAL
  got = processes.scalars(workdir)
  _assert_same_steps(got, want, LOSSES["bituning"], range(1, TOTAL + 1), 0.0)
  mine, theirs = (processes.final_state(d, TOTAL) for d in (workdir, ref_dir))
  np.testing.assert_array_equal(_flat(mine), _flat(theirs))


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes(source, bituning_reference, bituning_2x2,
                                        tmp_path):
  """SIGTERM to process 1 only: both stop at one step and save it; resumed by the same
  2 processes the run ends bitwise equal to an uninterrupted 2-process run; resumed by
  1 process x 4 devices (elastic 2 -> 1) it ends where the 1-process run ends."""
  overrides = _overrides(source, checkpoint_every=100)
  step, _ = _preempt("bituning", overrides, tmp_path / "run", target=1, **TWO)
  shutil.copytree(tmp_path / "run", tmp_path / "elastic")
  run = _train("bituning", overrides, tmp_path / "run", **TWO)
  assert run.wait() == [0, 0], run.log(0)[-3000:]
  mine, theirs = (processes.final_state(d, TOTAL)
                  for d in (tmp_path / "run", bituning_2x2[0]))
  np.testing.assert_array_equal(_flat(mine), _flat(theirs))

  _resume_elsewhere(tmp_path / "elastic", overrides, step, bituning_reference, **ONE)


def _resume_elsewhere(workdir, overrides, step, reference, *, processes_, devices):
  """Resumes the run stopped at `step` in `workdir` on another process layout: it
  starts at `step` and ends where the 1 x 4 reference ends."""
  _, want, ref_summary = reference
  run = _train("bituning", overrides, workdir, processes_=processes_, devices=devices)
  assert run.wait() == [0] * processes_, run.log(0)[-3000:]
  assert f"at step {step}" in run.log(0)
  _assert_same_steps(processes.scalars(workdir), want, LOSSES["bituning"],
                     range(step + 1, TOTAL + 1), LAYOUT_RTOL)
  summary = json.loads((workdir / "summary.json").read_text())
  _assert_same_eval(summary, ref_summary, ["top1", "mean_class_acc"])


# --------------------------------------------------------------------------- kill -9
@pytest.mark.slow
def test_kill_9_while_a_checkpoint_is_written(source, bituning_reference, tmp_path):
  """kill -9 right after a checkpoint step is logged (its asynchronous write under way,
  or just done): the next start resumes from the last complete checkpoint and ends
  bitwise equal to the uninterrupted run."""
  ref_dir, want, _ = bituning_reference
  overrides, workdir = _overrides(source), tmp_path / "run"
  run = _train("bituning", overrides, workdir, **ONE)
  run.wait_for(rf"step 6/{TOTAL}")
  run.kill()
  assert (workdir / ".lock").exists()  # stale: its flock went with the process
  complete = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  assert complete and complete[-1] in (3, 6), os.listdir(workdir / "checkpoints")
  # And what a kill in the middle of writing step 7 leaves for certain: its temporary
  # folder, half full (no commit marker, truncated arrays).
  half = workdir / "checkpoints" / "7.orbax-checkpoint-tmp"
  shutil.copytree(workdir / "checkpoints" / str(complete[-1]), half)
  for f in half.rglob("*"):
    if f.is_file():
      f.unlink() if f.name == "commit_success.txt" else os.truncate(f, f.stat().st_size // 2)
  run = _train("bituning", overrides, workdir, **ONE)
  assert run.wait() == [0], run.log()[-3000:]
  assert f"at step {complete[-1]}" in run.log()
  assert not [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]
  mine, theirs = (processes.final_state(d, TOTAL) for d in (workdir, ref_dir))
  np.testing.assert_array_equal(_flat(mine), _flat(theirs))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_unreadable_checkpoint_is_named_and_the_one_before_it_used(tmp_path):
  """The newest checkpoint's array files truncated (a disk that lost them): the run
  names it, sets it aside (kept, in checkpoints-unreadable/) and resumes from the one
  before it; the step is written afresh when the run reaches it again."""
  import fakes  # pylint: disable=g-import-not-at-top
  config = fakes.tiny_config("finetune")  # checkpoints at 3 and 6
  loop.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]  # two kept
  truncated = list((tmp_path / "checkpoints" / "6").glob("default/ocdbt.process_0/d/*"))
  assert truncated
  for f in truncated:
    with open(f, "r+b") as handle:
      handle.truncate(10)
  config.total_steps = 9
  with fakes.our_log() as records:
    _, summary = loop.train_and_evaluate(config, str(tmp_path))
  text = "\n".join(r.getMessage() for r in records)
  assert re.search(rf"checkpoint {tmp_path}/checkpoints/6 cannot be read \(.+\); moved "
                   rf"to {tmp_path}/checkpoints-unreadable/6, resuming from step 3 "
                   "instead", text), text
  assert f"resumed from {tmp_path}/checkpoints at step 3" in text
  assert summary["step"] == 9
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "9"]
  assert os.listdir(tmp_path / "checkpoints-unreadable") == ["6"]
  processes.final_state(tmp_path, 6)  # the new step 6 reads


def test_a_checkpoint_that_differs_between_processes_is_refused(source, tmp_path):
  """`init_from` names a file on each process's own disk: the processes must have read
  the same one (their sha256 agree), or the run stops in one line before training.
  Here `$SRC` is the demo's source on process 0 and a perturbed copy on process 1."""
  other = tmp_path / "other.npz"
  arrays = dict(np.load(source))
  name = next(k for k, v in arrays.items() if v.dtype == np.float32 and v.size > 1)
  arrays[name] = arrays[name] + np.float32(1e-3)
  np.savez(other, **arrays)
  run = processes.launch(
      processes.config_flags(CONFIG_FILES["bituning"],
                             dict(BASE, init_from="$SRC"))
      + ["--workdir", str(tmp_path / "run")], str(tmp_path / "logs"), processes=2,
      devices=2, env_of=lambda i: {"SRC": source if i == 0 else str(other)})
  assert run.wait(timeout=300) == [2, 2], run.log(0)[-3000:]
  for i in range(2):
    assert run.log(i).strip().endswith(
        f"bitune-train: error: init_from {source if i == 0 else other} is not the same "
        "file on every process (their sha256 differ)"), run.log(i)[-2000:]
    assert "Traceback" not in run.log(i)
  assert "step 1/" not in run.log(0)


@pytest.mark.parametrize("flags, message", [
    (["--coordinator_address=localhost:1"],
     "--coordinator_address needs --num_processes and --process_id"),
    (["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"],
     "--process_id=2 must be in [0, 2)"),
])
def test_process_flags_are_checked(flags, message, tmp_path):
  args = processes.config_flags("bituning.py:demo", {}) + [
      "--workdir", str(tmp_path / "run")] + flags
  run = processes.launch(args, str(tmp_path / "logs"))
  assert run.wait(timeout=120) == [2]
  assert run.log().strip().endswith(f"bitune-train: error: {message}"), run.log()[-2000:]
  assert not (tmp_path / "run").exists()
