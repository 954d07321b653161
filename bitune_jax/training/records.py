"""A workdir's records of its run: `config.json` (the config it trains under now),
`launches/` (every launch's config and the step it started from), and what a resumed
run may change; the folders a run creates, removed again if its start fails.
"""

import json
import logging
import os

import jax
from etils import epath

from bitune_jax import files
from bitune_jax.training import config_base, workdir_lock

log = logging.getLogger("bitune_jax")


# What a resumed run may change: how long it runs and how often it reports. Any other
# change would make the checkpoint and `config.json` describe different runs.
RESUMABLE = ("total_steps", "eval_every", "log_every", "checkpoint_every",
             "eval_batch_size", "data.threads", "data.cache_dir", "profile_steps")
IDENTITY = ("method", "arch", "num_classes", "dataset")


def _flat(tree, prefix=""):
  """`{"a": {"b": 1}}` -> `{"a.b": 1}` (JSON values: tuples are lists)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_changes(config, workdir):
  """`{field: (recorded, now)}` between `workdir/config.json` (in today's shape, the
  fields added since with the values it trained with: `config_base.stored`) and
  `config`."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return {}
  saved = _flat(config_base.stored(json.loads(path.read_text())))
  now = _flat(json.loads(config.to_json_best_effort()))
  return {k: (saved.get(k), now.get(k)) for k in sorted(saved.keys() | now.keys())
          if saved.get(k) != now.get(k)}


def check_against_workdir(config, workdir, resuming):
  """A workdir holds one experiment. Another method, arch, class count or dataset is
  always refused; a resumed run may change only `RESUMABLE` fields. Returns the
  changes (to be recorded once setup has succeeded)."""
  changes = config_changes(config, workdir)
  for key in IDENTITY:
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


def record_config(config, workdir, step, changes):
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


def missing_folders(workdir):
  """The local folders a run would create (the workdir and its checkpoint folders)."""
  if "://" in str(workdir):
    return []
  paths = [os.path.join(workdir, "checkpoints"), os.path.join(workdir, "best")]
  return ([p for p in paths if not os.path.exists(p)]
          + workdir_lock.missing_folders(os.path.abspath(workdir)))


def remove_if_empty(folders):
  if jax.process_index() != 0:
    return
  for folder in sorted(folders, key=len, reverse=True):  # children first
    if os.path.isdir(folder) and not os.listdir(folder):
      os.rmdir(folder)


def load_config(workdir):
  """The run's `config.json`, in today's shape (`config_base.stored`: an older run's
  record carries every method's sections)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no config.json: not a bitune-train workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(config_base.stored(json.load(f)))
