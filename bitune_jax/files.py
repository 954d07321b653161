"""Files that several processes share: one writer (process 0), whole files only.

A file is written to a temporary name beside it and renamed into place, so a reader (or
a process killed while writing) never sees half of it; it gets the permissions the
umask gives a new file (0644 under umask 022: a teammate on a shared filesystem reads
it). On object stores (gs://) an object appears only when its upload is complete.
`sync` makes the other processes wait until process 0 has written what they read next.
"""

import os
import tempfile

import jax
from etils import epath


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes `data` to `path` whole or not at all (any process may call it)."""
  mode = "w" if isinstance(data, str) else "wb"
  if "://" in os.fspath(path):
    with epath.Path(path).open(mode) as f:
      f.write(data)
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                             dir=folder)
  try:
    with os.fdopen(fd, mode) as f:
      os.fchmod(f.fileno(), 0o666 & ~umask())  # as open() makes it (mkstemp: 0600)
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def umask() -> int:
  """The process's umask, read without changing it where Linux shows it (a thread
  creating a file meanwhile would otherwise get the temporary one)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def write_once(path: str | os.PathLike, data: str | bytes) -> None:
  """Process 0 writes `data` to `path` (atomically); the others write nothing."""
  if jax.process_index() == 0:
    write_atomically(path, data)


def sync(name: str) -> None:
  """Every process waits here for all the others (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
