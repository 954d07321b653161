"""`bitune-train --config configs/bituning.py:demo --workdir DIR [--config.x=y ...]`.

Parses flags and calls the training loop; user errors come out as one line and exit
code 2 (`--verbose` for the traceback).
"""

import json
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Config file and argument, e.g. configs/bituning.py:cub,resnet50,25",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Logs, checkpoints and summary.json go here.")
flags.DEFINE_bool("verbose", False, "Show the traceback of an error.")
flags.DEFINE_bool("print_config", False,
                  "Print the resolved config (every field, defaults included) and exit.")
flags.DEFINE_string("coordinator_address", None,
                    "HOST:PORT of process 0, for several processes (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "How many processes run this command.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["config"])

HELP = """usage: bitune-train --config FILE[:ARG] --workdir DIR [--config.FIELD=VALUE ...]

Trains, evaluates and checkpoints one run; a run started again in the same DIR resumes.

  --config FILE[:ARG]   a config file and its argument: ARG is `demo` (the offline
                        digits task) or `dataset,arch,rate`, e.g.
                        configs/bituning.py:cub,resnet50,25
  --config.FIELD=VALUE  override one field (nested: --config.bituning.queue_size=8);
                        a misspelt field is an error. --print_config lists them all.
  --workdir DIR         config.json, launches/, checkpoints/, best/, summary.json and
                        TensorBoard events go here (a local path or gs://...)
  --coordinator_address HOST:PORT --num_processes N --process_id I
                        one of N processes (jax.distributed; on CPU over gloo, so N
                        processes also run on one machine). --config.multi_host=True
                        without them detects the cluster (TPU pod, SLURM)
  --print_config        print the resolved config, every field with its value, and exit
  --list                the methods, configs, datasets and table specs, and exit
  --version             the installed bitune-jax version
  --verbose             show the traceback of an error (errors are one line otherwise)
  --helpfull            every absl flag (logging, multi-process)

examples:
  bitune-train --config configs/bituning.py:demo --workdir /tmp/bitune-demo
  bitune-train --config configs/bituning.py:cub,resnet50,25 --workdir DIR \\
      --config.init_from=resnet50.npz --config.total_steps=9000
"""


def _one_line(error):
  """An exception's message on one line, without ml_collections' quoting."""
  text = str(error).replace("\\n", " ").replace("\\'", "'")
  text = " ".join(text.split())
  if len(text) > 1 and text[0] == text[-1] in "'\"" and text[0] not in text[1:-1]:
    text = text[1:-1]  # a KeyError's quotes around the whole message, not a value's
  raised = re.search(r"Traceback \(most recent call last\):.*\b\w*(?:Error|Exception): (.*)",
                     text)  # a config file's own error, its traceback in the message
  if raised:
    text = text[:raised.start()].replace("Error whilst parsing config file: ", "") + (
        raised[1])
  missing = re.match(r"""['"]*(\w+)'? Did you mean "(\w+)" instead of "\w+"\?""", text)
  if missing:
    return f"unknown config field {missing[1]!r} (did you mean {missing[2]!r}?)"
  return text


def _fail(message):
  print(f"bitune-train: error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_file(value):
  """The `--config` value, shipped configs found (`configs.find`: `configs/X.py[:ARG]`
  or `X[:ARG]` from any directory); a missing file is said in a line."""
  from bitune_jax import configs  # pylint: disable=g-import-not-at-top
  path, sep, arg = os.path.expanduser(value).partition(":")
  path = configs.find(path)
  value = path + sep + arg
  if not os.path.isfile(path):
    _fail(f"--config {path}: no such file; give a config file and its argument, e.g. "
          "configs/bituning.py:demo")
  return value


def _parse_flags(argv):
  """absl's parsing, with config errors (a misspelt override, a bad value) as one line."""
  if any(a in ("-h", "--help", "-help") for a in argv[1:]):
    print(HELP, end="")
    sys.exit(0)
  if "--version" in argv[1:]:
    from bitune_jax.cli import console  # pylint: disable=g-import-not-at-top
    print(f"bitune-train {console.version()}")
    sys.exit(0)
  if "--list" in argv[1:]:
    from bitune_jax.cli import catalog  # pylint: disable=g-import-not-at-top
    print(catalog.text(), end="")
    sys.exit(0)
  argv, config = list(argv), None
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      config = _config_file(a[len("--config="):])
      argv[i] = "--config=" + config
    elif a == "--config" and i + 1 < len(argv):
      argv[i + 1] = config = _config_file(argv[i + 1])
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{_one_line(e)}\nPass --help for usage.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    if "--verbose" in argv:
      raise
    _fail(_foreign_override(argv, config) or _one_line(e))


def _foreign_override(argv, config_value):
  """The error of an override of a field in another method's section (the finetune
  config has no `bituning.temperature`), naming that method; None if there is none."""
  from bitune_jax.training import config_base  # pylint: disable=g-import-not-at-top
  fields = [m[1] for m in (re.match(r"-{1,2}(?:no)?config\.([^=]+)", a) for a in argv) if m]
  if not config_value or not any(f.split(".")[0] in config_base.method_sections()
                                 for f in fields):
    return None
  try:  # the config as absl loaded it, without the overrides
    method = flags.FLAGS["config"].parser.parse(config_value).method
  except Exception:  # pylint: disable=broad-except
    return None  # the file's own error: absl's message says it
  return next(filter(None, (config_base.foreign_field(method, f) for f in fields)), None)


def _last_checkpoint(workdir):
  folder = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(
      folder) else []
  return max(steps) if steps else None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if flags.FLAGS.print_config:
    print(flags.FLAGS.config, end="")
    return
  # Imported after flag parsing so that --help is quick.
  # pylint: disable-next=g-import-not-at-top
  import jax
  from bitune_jax import sharding
  from bitune_jax.cli import console
  from bitune_jax.training import config_base, stopping, workdir_lock
  from bitune_jax.experiments import demo
  console.setup()  # our progress lines; orbax, clu, absl only from warnings up
  f = flags.FLAGS
  try:
    sharding.initialize_multihost(f.config.multi_host, f.coordinator_address,
                                  f.num_processes, f.process_id)
  except ValueError as e:
    _fail(str(e))
  workdir = flags.FLAGS.workdir  # a local path or a URL (gs://...) on a TPU pod
  if not workdir:
    _fail("--workdir is required (where checkpoints and summary.json go)")
  if "://" not in workdir:  # `~` and $VAR too: the shell leaves `--workdir=~/run` as it is
    workdir = os.path.abspath(config_base.expand_path(workdir))
  try:  # a second command in the same workdir is refused before anything compiles
    with workdir_lock.hold(workdir, "bitune-train"):
      _, summary = demo.train_and_evaluate(flags.FLAGS.config, workdir)
  except (ValueError, FileNotFoundError) as e:  # bad input: said in a line
    if flags.FLAGS.verbose:
      raise
    _fail(_one_line(e))
  except FloatingPointError as e:  # a diverged run: where its last good state is
    if flags.FLAGS.verbose:
      raise
    print(f"bitune-train: {e}", file=sys.stderr)
    sys.exit(1)
  except stopping.Stopped as e:  # SIGTERM (preemption) or Ctrl-C: saved, resumable
    print(f"bitune-train: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:
    step = _last_checkpoint(workdir)
    where = (f"the last checkpoint is step {step} in {workdir}/checkpoints"
             if step is not None else f"no checkpoint was saved yet in {workdir}")
    print(f"bitune-train: interrupted; {where}; the same command resumes",
          file=sys.stderr)
    sys.exit(130)
  if jax.process_index() > 0:  # process 0 reports for all
    return
  print(json.dumps(summary, indent=2))
  if "top1" in summary:
    print(f"test top-1 {summary['top1']:.4f}, mean per-class accuracy "
          f"{summary['mean_class_acc']:.4f} (summary in {workdir}/summary.json)")
  else:  # trained without labels: the feature protocols
    print(f"test top-5 retrieval {summary['retrieval_top5']:.4f}, k-means BCubed "
          f"precision {summary['kmeans_bcubed_precision']:.4f}, linear probe top-1 "
          f"{summary['linear_probe_top1']:.4f} (summary in {workdir}/summary.json)")


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
