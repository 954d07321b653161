"""One command at a time in a workdir: a second bitune-train, bitune-sweep or bitune-eval
started in a workdir another process holds is refused at once (one line naming the
holder, exit 2, the workdir untouched); a lock left by a process killed with kill -9
does not block the next run. The holder here is a small helper process; the real runs
(SIGTERM, Ctrl-C, kill -9, several processes) are in test_multiprocess.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import processes
from bitune_jax.cli import eval as eval_cli
from bitune_jax.cli import sweep as sweep_cli
from bitune_jax.training import workdir_lock

HOLD = """
import sys, time
from bitune_jax.training import workdir_lock
with workdir_lock.hold(sys.argv[1], "holder"):
  print("held", flush=True)
  time.sleep(120)
"""


def _hold(workdir):
  """A process holding `workdir`'s lock (killed at the end of the test)."""
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)],
                          stdout=subprocess.PIPE, text=True, cwd=processes.ROOT)
  assert proc.stdout.readline() == "held\n"
  return proc


@pytest.fixture
def holder(tmp_path):
  """`(workdir, process)`: a workdir with a run's records, held by another process."""
  workdir = tmp_path / "w"
  (workdir / "checkpoints" / "20").mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps({"multi_host": False}))
  (workdir / "checkpoints" / "20" / "state").write_bytes(b"weights")
  proc = _hold(workdir)
  yield workdir, proc
  proc.kill()
  proc.wait()


def _contents(folder):
  """Every file and folder under `folder` with its bytes and modification time."""
  out = {}
  for root, dirs, names in os.walk(folder):
    for name in dirs + names:
      path = os.path.join(root, name)
      out[path] = (os.stat(path).st_mtime_ns,
                   None if os.path.isdir(path) else open(path, "rb").read())
  return out


def _assert_refused(text, workdir, proc, tool, *, logged=()):
  """`text` is one error line (after the lines that match `logged`, if any)."""
  lines = [line for line in text.strip().splitlines()
           if not any(pattern in line for pattern in logged)]
  assert len(lines) == 1, text
  assert lines[0] == (
      f"{tool}: error: {workdir} is in use by process {proc.pid} on host "
      f"{socket.gethostname()} since {lines[0].split(' since ')[1].split(' ')[0]} "
      f"(holder); wait for it to end or stop it, then run this again"), text


def test_a_second_bitune_train_is_refused_at_once_and_touches_nothing(holder, tmp_path):
  workdir, proc = holder
  before = _contents(workdir)
  run = processes.launch(processes.config_flags("finetune.py:demo", {"total_steps": 2})
                         + ["--workdir", str(workdir)], str(tmp_path / "logs"))
  began = time.perf_counter()
  assert run.wait(timeout=120) == [2], run.log()
  assert time.perf_counter() - began < 60  # refused before anything compiles or loads
  _assert_refused(run.log(), workdir, proc, "bitune-train")
  assert _contents(workdir) == before


def test_two_processes_of_a_second_run_are_both_refused(holder, tmp_path):
  """Process 0 decides for its run: process 1 says the same and exits too."""
  workdir, proc = holder
  before = _contents(workdir)
  run = processes.launch(processes.config_flags("finetune.py:demo", {"total_steps": 2})
                         + ["--workdir", str(workdir)], str(tmp_path / "logs"),
                         processes=2, devices=4)
  assert run.wait(timeout=120) == [2, 2], run.log(0) + run.log(1)
  for i in range(2):
    _assert_refused(run.log(i), workdir, proc, "bitune-train",
                    logged=[f"multi-host: process {i} of 2"])
  assert _contents(workdir) == before


def test_sweep_and_eval_refuse_a_held_workdir(holder, capsys):
  workdir, proc = holder
  before = _contents(workdir)
  with pytest.raises(SystemExit) as exit_:
    eval_cli.main(["--workdir", str(workdir)])
  assert exit_.value.code == 2
  _assert_refused(capsys.readouterr().err, workdir, proc, "bitune-eval")
  with pytest.raises(SystemExit) as exit_:
    sweep_cli.main(["--workdir", str(workdir), "--methods", "finetune", "--datasets",
                "digits", "--set", "total_steps=2"])
  assert exit_.value.code == 2
  _assert_refused(capsys.readouterr().err, workdir, proc, "bitune-sweep")
  assert _contents(workdir) == before


def test_a_lock_left_by_kill_9_does_not_block_the_next_run(tmp_path):
  workdir = tmp_path / "w"
  proc = _hold(workdir)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  stale = json.loads((workdir / workdir_lock.NAME).read_text())
  assert stale["pid"] == proc.pid  # the file stays; its flock went with the process
  with workdir_lock.hold(str(workdir), "next"):
    mine = json.loads((workdir / workdir_lock.NAME).read_text())
    assert mine["pid"] == os.getpid() and mine["command"] == "next"
  assert not (workdir / workdir_lock.NAME).exists()


def test_released_on_exceptions_and_reentrant_within_a_process(tmp_path):
  workdir = str(tmp_path / "w")
  with pytest.raises(KeyboardInterrupt):
    with workdir_lock.hold(workdir, "first"):
      with workdir_lock.hold(workdir, "same process"):  # sweep: a run's eval inside
        pass
      raise KeyboardInterrupt
  assert not os.path.exists(workdir)  # it held the lock only: nothing left behind
  os.makedirs(workdir)
  with pytest.raises(ValueError, match="bad config"):
    with workdir_lock.hold(workdir, "second"):
      raise ValueError("bad config")
  assert os.listdir(workdir) == []  # a folder that was there stays
  proc = _hold(workdir)  # and another process takes it at once
  proc.kill()
  proc.wait()


def test_sweep_and_eval_refuse_a_workdir_that_cannot_be_one(tmp_path, capsys):
  """A file as DIR, or a DIR under a file: one line, exit 2, nothing made."""
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  for workdir, says in ((a_file, f"workdir {a_file} is a file, not a folder"),
                        (a_file / "grid", f"would be under {a_file}, which is a file")):
    with pytest.raises(SystemExit) as exit_:
      sweep_cli.main(["--workdir", str(workdir), "--methods", "finetune", "--datasets",
                  "digits", "--set", "total_steps=2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitune-sweep: error: ") and says in err, err
    assert "\n" not in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
  assert a_file.read_text() == "mine"
  # A new, nested DIR that a held lock refuses is removed again, parents included.
  with workdir_lock.hold(str(tmp_path / "w"), "holder"):
    pass
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
  nested = tmp_path / "new" / "run"
  with workdir_lock.hold(str(nested), "holder"):
    assert nested.is_dir()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
