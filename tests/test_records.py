"""A workdir's records: config.json describes the run that trained, every launch is
kept, a finished run's summary stays, changes that break a resumed run are refused."""

import importlib
import json
import os
import re
import shutil
import types

import pytest

from bitune_jax import methods
from bitune_jax.training import config_base
from bitune_jax.experiments import protocols
from bitune_jax.training import loop, records

import fakes  # noqa: E402  pylint: disable=g-import-not-at-top


def _config(**overrides):
  # The file's runs are 4 steps (`finished`) or 6 (the resumes and `validated`): two
  # train-step programs (the schedule's steps are in them), each compiled once, and
  # those of tests/test_loop.py's 4-step and tests/test_finetune.py's 6-step runs.
  defaults = {"log_every": 2, "eval_every": 2, "checkpoint_every": 2, "total_steps": 4}
  return fakes.tiny_config("finetune", **{**defaults, **overrides})


def _count_steps(monkeypatch):
  """The steps that really ran: each call of the jitted train step, by its start step."""
  calls = []  # the step each call starts from
  real_setup = loop.setup

  def setup(*args, **kwargs):
    run = real_setup(*args, **kwargs)
    jitted = run.train_step

    def step(state, batch):
      calls.append(int(state.step))
      return jitted(state, batch)
    run.train_step = step
    return run
  monkeypatch.setattr(loop, "setup", setup)
  return calls


@pytest.fixture
def step_counter(monkeypatch):
  return _count_steps(monkeypatch)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """One finished 4-step run (`_config()`), which each test that trains on or changes
  a workdir copies (`_copy`). Its command first failed in the same workdir (init_from
  a missing file): `failure` and `recorded_by_failure` are what that left, for
  test_a_failed_start_records_nothing. Made under umask 022 (the modes of its files:
  test_a_rerun_of_a_finished_run_records_nothing_and_results_are_readable)."""
  root = tmp_path_factory.mktemp("finished")
  workdir = root / "run"
  old = os.umask(0o022)
  try:
    with pytest.MonkeyPatch.context() as monkeypatch:
      steps = _count_steps(monkeypatch)
      try:
        loop.train_and_evaluate(_config(init_from=str(root / "missing.npz")),
                                str(workdir))
        failure = None
      except Exception as e:  # pylint: disable=broad-except
        failure = e
      recorded_by_failure = (workdir / "config.json").exists()
      _, summary = loop.train_and_evaluate(_config(), str(workdir))
  finally:
    os.umask(old)
  return types.SimpleNamespace(workdir=workdir, summary=summary, steps=steps,
                               failure=failure, recorded_by_failure=recorded_by_failure)


def _copy(finished, tmp_path):
  """A copy of the finished run's workdir, for a test to train on or change."""
  workdir = tmp_path / "run"
  shutil.copytree(finished.workdir, workdir)
  return workdir


def _json(path):
  return json.loads(path.read_text())


def test_rerunning_a_finished_workdir_keeps_its_summary(finished, tmp_path, step_counter):
  workdir = _copy(finished, tmp_path)
  assert finished.steps == [0, 1, 2, 3]
  before = (workdir / "summary.json").read_bytes()
  assert finished.summary["train_loss"] is not None
  _, again = loop.train_and_evaluate(_config(), str(workdir))
  assert step_counter == []  # nothing trained
  assert (workdir / "summary.json").read_bytes() == before
  assert again == finished.summary


def test_resume_with_more_steps_is_recorded_and_other_changes_are_refused(
    finished, tmp_path, step_counter):
  workdir = _copy(finished, tmp_path)
  # A change that would make the checkpoint another run's: refused, naming it, and
  # nothing about the workdir changes.
  recorded = (workdir / "config.json").read_bytes()
  with pytest.raises(ValueError, match=re.escape(
      "trained with lr=0.05 (now 0.5). A resumed run may change only total_steps")):
    loop.train_and_evaluate(_config(lr=0.5, total_steps=6), str(workdir))
  assert (workdir / "config.json").read_bytes() == recorded
  assert step_counter == []
  # More steps: accepted; exactly steps 5 and 6 run, and config.json says 6.
  _, summary = loop.train_and_evaluate(_config(total_steps=6), str(workdir))
  assert step_counter == [4, 5]
  assert summary["step"] == 6 and _json(workdir / "summary.json")["step"] == 6
  assert _json(workdir / "config.json")["total_steps"] == 6
  launches = sorted((workdir / "launches").iterdir())
  assert [p.name for p in launches] == ["launch-000.json", "launch-001.json"]
  first, second = (_json(p) for p in launches)
  assert first["start_step"] == 0 and first["config"]["total_steps"] == 4
  assert second["start_step"] == 4 and second["changes"] == {"total_steps": [4, 6]}


def test_a_run_recorded_before_new_fields_resumes_with_the_values_it_trained_with(
    finished, tmp_path, step_counter):
  """A config.json written before `head_init` existed: the run started its head as
  Flax's default (lecun), so resuming it needs `head_init=lecun`."""
  workdir = _copy(finished, tmp_path)
  path = workdir / "config.json"
  old = _json(path)
  del old["head_init"]
  path.write_text(json.dumps(old))
  with pytest.raises(ValueError, match=re.escape("head_init='lecun' (now '')")):
    loop.train_and_evaluate(_config(total_steps=6), str(workdir))
  assert step_counter == []
  _, summary = loop.train_and_evaluate(_config(total_steps=6, head_init="lecun"),
                                       str(workdir))
  assert step_counter == [4, 5] and summary["step"] == 6


def _old_shape(config):
  """`config`'s record as written when every config carried every method's sections:
  Bi-tuning's, Co-Tuning's and unsupervised fine-tuning's (of their demo configs)."""
  record = json.loads(config.to_json())
  for method in ("bituning", "cotuning", "unsup_finetune"):
    section, = config_base.sections()[method]
    module = importlib.import_module(f"bitune_jax.configs.{method}")
    record.setdefault(section, json.loads(module.get_config("demo")[section].to_json()))
  return record


def test_a_run_recorded_with_every_methods_sections_evaluates_and_resumes(
    finished, tmp_path, step_counter):
  """A vanilla fine-tuning run recorded with the other methods' sections (and values
  in them that it never read, which no config takes now): bitune-eval evaluates it,
  and it resumes as the same run: no change recorded but the longer run, and its
  config.json then has its own sections alone."""
  workdir = _copy(finished, tmp_path)
  path = workdir / "config.json"
  old = _old_shape(_config())
  old["bituning"]["temperature"] = 0.0
  path.write_text(json.dumps(old))
  assert protocols.evaluate_workdir(str(workdir))["step"] == 4
  _, summary = loop.train_and_evaluate(_config(total_steps=6), str(workdir))
  assert step_counter == [4, 5] and summary["step"] == 6
  launches = sorted((workdir / "launches").iterdir())
  assert _json(launches[-1])["changes"] == {"total_steps": [4, 6]}
  assert not {"bituning", "cotuning", "unsup"} & set(_json(path))


def test_a_recorded_config_is_compared_in_todays_shape(tmp_path):
  """What a resume compares with (`records.config_changes`, no training here): a
  Bi-tuning run recorded before its loss weights and key generation existed trained
  with their defaults; a GPT* run recorded when it read Bi-tuning's projector width
  has that width as its own `gpt_star.projector_dim` (another is a change)."""
  config = fakes.tiny_config("bituning")
  old = json.loads(config.to_json())
  for name in ("ce_weight", "cce_weight", "ccl_weight", "key_generation",
               "bank_momentum"):
    del old["bituning"][name]
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert records.config_changes(config, tmp_path) == {}
  config = fakes.tiny_config("gpt_star")
  old = _old_shape(config)
  del old["gpt_star"]["projector_dim"]
  old["bituning"]["projector_dim"] = 64
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert records.config_changes(config, tmp_path) == {"gpt_star.projector_dim": (64, 128)}
  config.gpt_star.projector_dim = 64
  assert records.config_changes(config, tmp_path) == {}


def test_a_failed_start_records_nothing(finished):
  """`finished`'s command first ran with init_from a missing file, in the same workdir."""
  assert re.search("missing.npz", str(finished.failure)), finished.failure
  assert not finished.recorded_by_failure
  # The corrected command then ran, and config.json records it.
  assert _json(finished.workdir / "config.json")["init_from"] == ""
  assert _json(finished.workdir / "config.json")["total_steps"] == 4


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
  """A 6-step run (`_config(total_steps=6)`, the resumes' train-step program) with a
  quarter of the training images held out (data.val_fraction), its learning rates
  logged at every step and steps 3-4 profiled. `chosen`: at each eval step, the
  validation top-1 the loop gave `save_best`, and the same recomputed from outside."""
  import outside  # pylint: disable=g-import-not-at-top
  from bitune_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from bitune_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("validated")
  config = _config(total_steps=6, eval_every=2, checkpoint_every=2, log_every=1,
                   profile_steps=2)
  config.data.val_fraction = 0.25
  data = input_lib.load(config, methods.data_needs(config))
  model = methods.get("finetune").build_model(config, 5)
  chosen, real_save_best = {}, checkpoint.Checkpoints.save_best

  def save_best(ckpts, step, state, metrics):
    out = outside.eval_outputs(model, state.params, state.batch_stats,
                               outside.eval_images(data.val))
    chosen[step] = (metrics["top1"], outside.top1_and_mean_class(out["logits"],
                                                                 data.val.labels)[0])
    return real_save_best(ckpts, step, state, metrics)
  with pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.setattr(checkpoint.Checkpoints, "save_best", save_best)
    _, summary = loop.train_and_evaluate(config, str(workdir))
  return types.SimpleNamespace(workdir=workdir, config=config, data=data, chosen=chosen,
                               summary=summary)


def test_learning_rates_logged_per_group_and_a_profile_written(validated):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  logged = {}
  for events in validated.workdir.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(events)):
      for value in event.summary.value:
        if value.tag.startswith("lr/"):
          logged[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
  # Train step s applies the schedule at optimizer step s - 1: lr 0.05, x0.1 from each
  # optimizer step int(f * 6) on, for f in decay_at (the demo's (0.7,): from step 4 on).
  config = validated.config
  assert (config.lr, config.decay_factor, tuple(config.decay_at)) == (0.05, 0.1, (0.7,))
  for step in range(1, 7):
    rate = 0.05 * 0.1 ** sum(step - 1 >= int(f * 6) for f in config.decay_at)
    assert logged[("lr/head", step)] == pytest.approx(rate, rel=1e-6), step
    assert logged[("lr/backbone", step)] == pytest.approx(0.1 * rate, rel=1e-6), step
  traces = list(validated.workdir.glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_best_checkpoint_chosen_on_a_held_out_validation_split(validated):
  """data.val_fraction: a stratified part of the training images is held out, never
  trained on, and the best checkpoint is the eval step with the best validation top-1
  (recomputed from outside); summary.json's headline stays the final checkpoint's."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bitune_jax.data import digits  # pylint: disable=g-import-not-at-top
  data, chosen = validated.data, validated.chosen
  full = digits.load_digits_transfer("target", image_size=16, sampling_rate=25, seed=0)
  counts = np.bincount(full["train_labels"])
  np.testing.assert_array_equal(np.bincount(data.val.labels), np.floor(0.25 * counts))
  np.testing.assert_array_equal(np.bincount(data.train.labels) + np.bincount(
      data.val.labels), counts)
  rows = lambda images: {x.tobytes() for x in images}  # noqa: E731
  assert not rows(data.val.images) & rows(data.pool.images)  # never trained on
  assert sorted(chosen) == [2, 4, 6]
  for step, (given, recomputed) in chosen.items():
    assert given == pytest.approx(recomputed, abs=1.01 / len(data.val.labels)), step
  scores = {step: given for step, (given, _) in chosen.items()}
  best = max(scores, key=lambda s: (scores[s], s))  # orbax keeps the last of ties
  assert validated.summary["best_checkpoint"] == {"step": best, "chosen_on": "validation"}
  assert validated.summary["step"] == 6  # the headline: the final checkpoint


def _records(workdir):
  """What a launch records: config.json, launches/ and the events files, as bytes."""
  return {p.relative_to(workdir).as_posix(): p.read_bytes() for p in
          [workdir / "config.json", *workdir.glob("launches/*"),
           *workdir.glob("events.out.tfevents*")]}


def test_a_rerun_of_a_finished_run_records_nothing_and_results_are_readable(
    finished, tmp_path, step_counter):
  """The same command again, or a lower total_steps: nothing trains, so config.json,
  launches/ and the events files stay as they were (config.json still says 4). Under
  umask 022 (`finished` ran under it) a teammate reads the results (0644, not
  mkstemp's 0600)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bitune_jax import convert, files  # pylint: disable=g-import-not-at-top
  for path in [finished.workdir / "config.json", finished.workdir / "summary.json",
               finished.workdir / "launches" / "launch-000.json"]:
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644), path
  workdir = _copy(finished, tmp_path)
  old = os.umask(0o022)
  try:
    written = [protocols._write_record(  # pylint: disable=protected-access
                   str(workdir), "latest-step4", {"top1": 0.5}),
               convert.save_converted(  # converted and exported models
                   {"backbone": {"w": np.zeros(2)}, "report": {"arch": "resnet18"}},
                   str(workdir / "model.npz"))]
    for path in written:
      assert oct(os.stat(path).st_mode & 0o777) == oct(0o644), path
    os.umask(0o027)
    files.write_atomically(workdir / "private.json", "{}")
    assert os.stat(workdir / "private.json").st_mode & 0o777 == 0o640
  finally:
    os.umask(old)
  before = _records(workdir)
  assert "launches/launch-000.json" in before and any(
      name.startswith("events.out.tfevents") for name in before)
  for total_steps in (4, 2):
    _, summary = loop.train_and_evaluate(_config(total_steps=total_steps), str(workdir))
    assert summary["step"] == 4
  assert step_counter == []
  assert _records(workdir) == before
  assert _json(workdir / "config.json")["total_steps"] == 4


def test_scalars_read_back_without_tensorflow_as_tensorflow_reads_them(tmp_path, rng):
  """`events.read_scalars`: our files and PyTorch's (TensorFlow 1's `simple_value`),
  starts read in the order they began whatever their names, a step written again by a
  later start keeps its later value, a record cut short ends its file; the same
  numbers as TensorFlow's own reader. A corrupt record is an error, not a skip."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from torch.utils import tensorboard as torch_tb  # pylint: disable=g-import-not-at-top
  from bitune_jax.training import events  # pylint: disable=g-import-not-at-top
  first, second = rng.normal(size=(2, 6)).astype(np.float32)
  starts = []
  for name, steps, values in (("9-first", range(1, 7), first),
                              ("0-second", range(3, 5), second)):
    writer = events.EventsFile(tmp_path)
    for step, value in zip(steps, values):
      writer.write_scalars(step, {"loss": value, "lr/head": 0.1 * step})
    writer.close()
    starts.append(tmp_path / f"events.out.tfevents.{name}.v2")
    os.rename(writer.path, starts[-1])
  with open(starts[-1], "ab") as f:  # a record cut short: its length, then nothing
    f.write(np.uint64(40).tobytes() + b"\0\0")
  torch_writer = torch_tb.SummaryWriter(str(tmp_path))
  for step in (1, 2):
    torch_writer.add_scalar("acc", 0.25 * step, step)
  torch_writer.close()
  got = events.read_scalars(str(tmp_path))

  want = {}
  torch_files = [p for p in tmp_path.glob("events.out.tfevents.*") if p not in starts]
  assert len(torch_files) == 1
  for path in starts + torch_files:
    try:
      for event in tf.compat.v1.train.summary_iterator(str(path)):
        for value in event.summary.value:
          number = (float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                    else value.simple_value)
          want.setdefault(value.tag, {})[event.step] = number
    except tf.errors.DataLossError:  # the cut record
      pass
  assert got == {tag: sorted(steps.items()) for tag, steps in want.items()}
  assert got["loss"] == [(s, float(v)) for s, v in zip(
      range(1, 7), [first[0], first[1], second[0], second[1], first[4], first[5]])]
  assert got["acc"] == [(1, 0.25), (2, 0.5)]
  assert [s for s, _ in got["lr/head"]] == list(range(1, 7))
  # Without TensorFlow: read in a process that has not imported it.
  code = ("import sys; from bitune_jax.training import events; "
          f"events.read_scalars({str(tmp_path)!r}); print('tensorflow' in sys.modules)")
  assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=True).stdout.strip() == "False"
  data = bytearray(starts[0].read_bytes())
  data[60] ^= 0xFF
  starts[0].write_bytes(bytes(data))
  with pytest.raises(ValueError, match="corrupt record"):
    events.read_scalars(str(tmp_path))
