"""`bitune-eval --workdir DIR [--which latest|best] [--kshot 1,2,4,8]`: the papers'
evaluation protocols on a run's checkpoint.

Rebuilds the run from `DIR/config.json`, restores its checkpoint and runs the
protocols of `bitune_jax.experiments.protocols` on it, each recorded in `DIR/evals/`.
"""

import argparse
import json
import logging
import os

from bitune_jax.cli import console

# jax, ml_collections and the training system are imported where they are used, so
# that `bitune-eval --help` and argument errors answer at once.
# pylint: disable=g-import-not-at-top

log = logging.getLogger("bitune_jax")

# The checkpoints a workdir holds, by the names bitune-eval and bitune-export share:
# the last one saved, and the one with the best evaluation (`training.loop.WHICH`).
# ('final' is latest's old name in bitune-export, still understood.)
WHICH = ("latest", "best")


def which_checkpoint(text):
  """`--which` of bitune-eval and bitune-export: 'final' -> 'latest'."""
  return "latest" if text == "final" else text


def _parse_shots(text, steps):
  try:
    shots = [int(k) for k in text.split(",")]
  except ValueError:
    shots = []
  if not shots or min(shots) < 1:
    raise ValueError(f"--kshot must be comma-separated positive integers, e.g. 1,2,4,8; "
                     f"got {text!r}")
  if steps < 1:
    raise ValueError(f"--kshot_steps must be >= 1, got {steps}")
  return shots


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="bitune-eval", description=__doc__.split("\n\n")[0].replace("\n", " "),
      epilog="Records: DIR/evals/{which}-step{S}.json and, per k, "
             "DIR/evals/{which}-step{S}-kshot{k}-steps{N}-seed0.json.")
  parser.add_argument("--workdir", required=True,
                      help="a bitune-train workdir (holds config.json and checkpoints/)")
  parser.add_argument("--which", choices=WHICH, type=which_checkpoint, default="latest",
                      help="the checkpoint to evaluate: the last one saved, or the one "
                           "with the best test score (default: latest)")
  parser.add_argument("--kshot", default="",
                      help="also fine-tune the backbone with k labelled images per class "
                           "for each k listed (e.g. 1,2,4,8) and report each test top-1")
  parser.add_argument("--kshot_steps", type=int, default=100,
                      help="training steps of each k-shot run (default: 100)")
  parser.add_argument("--tsne", action="store_true",
                      help="also draw a t-SNE of the test features, coloured by class "
                           "(DIR/plots/tsne-{which}-step{S}.png)")
  parser.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                      help="process 0's address, to run as one of several processes "
                           "(jax.distributed; with --num_processes and --process_id)")
  parser.add_argument("--num_processes", type=int, default=None,
                      help="how many processes run this command")
  parser.add_argument("--process_id", type=int, default=None,
                      help="this process's index in [0, num_processes)")
  console.add_version(parser)
  args = parser.parse_args(argv)
  try:
    from bitune_jax import sharding
    from bitune_jax.training import config_base, workdir_lock
    console.setup()  # our progress lines; orbax, clu, absl only from warnings up
    from bitune_jax.experiments import protocols
    from bitune_jax.training import records
    workdir = os.path.abspath(config_base.expand_path(args.workdir))
    sharding.initialize_multihost(
        bool(records.load_config(workdir).multi_host),
        args.coordinator_address, args.num_processes, args.process_id)
    shots = _parse_shots(args.kshot, args.kshot_steps) if args.kshot else None
    # Every evaluation writes into the workdir (evals/, plots/, kshot/) and reads its
    # checkpoints: not while a training run (or another evaluation) is in it.
    with workdir_lock.hold(workdir, "bitune-eval"):
      metrics = protocols.evaluate_workdir(workdir, which=args.which, tsne=args.tsne)
      if shots:
        metrics.update(protocols.kshot_transfer(workdir, shots=shots,
                                      total_steps=args.kshot_steps, which=args.which))
  except ValueError as e:
    parser.exit(2, f"bitune-eval: error: {e}\n")
  import jax
  if jax.process_index() == 0:  # process 0 reports for all
    print(json.dumps(metrics, indent=2))
  return 0


if __name__ == "__main__":
  main()
