"""One command at a time in a workdir: `with hold(workdir, "bitune-train"): ...`.

The lock is `WORKDIR/.lock`, a file naming its holder (host, pid, start time, command)
on which the holder keeps an advisory `flock` for as long as it runs. The kernel drops a
flock when its process ends, however it ends (kill -9 included), so a lock file whose
flock nobody holds is stale: the next command takes it over and rewrites it. A held
lock is refused at once with `InUse` (a `ValueError`: the entry points say it in one
line and exit 2), before anything in the workdir is touched. A normal exit, an exception,
SIGTERM or Ctrl-C (they leave the loop as exceptions) removes the file.

Several processes of one command (`jax.distributed`): process 0 takes the lock and tells
the others, through the coordination service's key-value store, whether the command may
go on; only process 0 touches the file, so a run never refuses its own processes.
URLs (gs://...) are not locked: object stores have no advisory locks.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import time

NAME = ".lock"
_held = {}  # real path of a workdir -> how many `hold`s of this process are open in it
_calls = [0]  # `hold`s so far: every process of a run counts the same, names its key


class InUse(ValueError):
  """Another command holds the workdir."""


def _holder(path):
  """What the lock file says (`{}` while its new holder is still writing it)."""
  for _ in range(40):
    try:
      with open(path) as f:
        return json.loads(f.read())
    except (OSError, ValueError):
      time.sleep(0.025)
  return {}


def _refusal(workdir, path):
  who = _holder(path)
  if not who:
    return f"{workdir} is in use by another process (see {path}); wait for it to end"
  return (f"{workdir} is in use by process {who.get('pid')} on host {who.get('host')} "
          f"since {who.get('since')} ({who.get('command')}); wait for it to end or stop "
          f"it, then run this again")


def _acquire(workdir, command):
  """The open, flocked lock file of `workdir` (created, with its folder, if missing)."""
  path = os.path.join(workdir, NAME)
  while True:
    os.makedirs(workdir, exist_ok=True)
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # the folder was removed by a holder leaving: again
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise InUse(_refusal(workdir, path)) from None
    try:  # its last holder may have removed this file between our open and flock
      mine, there = os.fstat(fd), os.stat(path)
      if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
        break
    except FileNotFoundError:
      pass
    os.close(fd)
  since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  record = {"host": socket.gethostname(), "pid": os.getpid(), "since": since,
            "command": command}
  os.ftruncate(fd, 0)  # a stale holder's record, if any, goes
  os.write(fd, json.dumps(record).encode())
  return fd


def check_workdir(workdir):
  """Refuses a local workdir that cannot be one (a file, under a file, in a folder
  that cannot be written) before anything is made; URLs (gs://...) are left to the
  store."""
  workdir = str(workdir)
  if "://" in workdir:
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir} is a file, not a folder: give another --workdir")
  folder = os.path.abspath(workdir)
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise ValueError(f"workdir {workdir} would be under {folder}, which is a file: give "
                     "another --workdir")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise ValueError(f"workdir {workdir}: cannot write in {folder} (permission denied); "
                     "give a --workdir you can write to")


def missing_folders(workdir: str) -> list[str]:
  """The folders that making `workdir` creates, deepest first."""
  missing = []
  while not os.path.exists(workdir):
    missing.append(workdir)
    workdir = os.path.dirname(workdir)
  return missing


def _release(workdir, fd, created):
  os.unlink(os.path.join(workdir, NAME))  # before the flock goes: see `_acquire`
  os.close(fd)
  for folder in created:  # a command that wrote nothing leaves no folder behind
    with contextlib.suppress(OSError):
      os.rmdir(folder)


def _distributed_client():
  """`(client, process index)` of a jax.distributed run; `(None, 0)` otherwise."""
  if "jax" not in sys.modules:  # no jax: no jax.distributed either
    return None, 0
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  state = distributed.global_state
  if state.client is None or not state.num_processes or state.num_processes < 2:
    return None, 0
  return state.client, state.process_id


@contextlib.contextmanager
def hold(workdir: str, command: str):
  """Holds `workdir`'s lock for the block (re-entrant within a process); raises `InUse`
  in every process of the command if another command holds it."""
  if "://" in workdir:
    yield
    return
  workdir = os.path.realpath(workdir)
  if workdir in _held:
    _held[workdir] += 1
    try:
      yield
    finally:
      _held[workdir] -= 1
    return
  client, index = _distributed_client()
  _calls[0] += 1
  key = f"bitune_jax/workdir_lock/{_calls[0]}"
  fd = None
  check_workdir(workdir)  # a file, under a file, not writable: one line, nothing made
  if index == 0:
    created = missing_folders(workdir)
    try:
      fd = _acquire(workdir, command)
    except BaseException as e:
      if client is not None:
        client.key_value_set(key, f"refused: {e}")
      raise
    if client is not None:
      client.key_value_set(key, "ok")
  else:  # process 0 decides for its run
    answer = client.blocking_key_value_get(key, 600_000)
    if answer != "ok":
      raise InUse(answer.removeprefix("refused: "))
  _held[workdir] = 1
  try:
    yield
  finally:
    del _held[workdir]
    if fd is not None:
      _release(workdir, fd, created)
