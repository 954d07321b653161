"""The console of our command-line tools: our progress lines at INFO, everyone else's
(orbax, clu, absl, TensorFlow) from WARNING up."""

import importlib.metadata
import logging
import sys


def add_version(parser):
  """`--version` of a tool: its name and the installed package's version."""
  parser.add_argument("--version", action="version",
                      version=f"{parser.prog} {version()}")


def version() -> str:
  """The installed package's version (`--version` of every tool)."""
  try:
    return importlib.metadata.version("bitune-jax")
  except importlib.metadata.PackageNotFoundError:  # a source tree on the path
    from bitune_jax import __version__  # pylint: disable=g-import-not-at-top
    return __version__


class _FirstProcessOnly(logging.Filter):
  """Progress (INFO) from process 0 alone in a multi-process run: the others would
  print the same lines. Warnings and errors from every process. The process index is
  read from `jax.distributed`'s state, which asking does not initialise."""

  def filter(self, record):
    if record.levelno >= logging.WARNING or "jax" not in sys.modules:
      return True
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return not distributed.global_state.process_id


def setup():
  """Routes the `bitune_jax` logger to stderr as `HH:MM:SS message` (progress from
  process 0 only); other loggers and absl speak only from WARNING up. Idempotent."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)
  ours = logging.getLogger("bitune_jax")
  for handler in list(ours.handlers):
    if getattr(handler, "_bitune_console", False):
      ours.removeHandler(handler)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  handler._bitune_console = True  # pylint: disable=protected-access
  handler.addFilter(_FirstProcessOnly())
  ours.addHandler(handler)
  ours.setLevel(logging.INFO)
  ours.propagate = False
