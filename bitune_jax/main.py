"""`bitune-train --config configs/bituning.py:demo --workdir DIR [--config.x=y ...]`.

Parses flags and calls the training loop; nothing else.
"""

import json
import logging as py_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Config file and argument, e.g. configs/bituning.py:cub,resnet50,25",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Logs, checkpoints and summary.json go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Our progress lines on the console; absl (orbax, clu) only from warnings up.
  logging.set_verbosity(logging.WARNING)
  handler = py_logging.StreamHandler()
  handler.setFormatter(py_logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  ours = py_logging.getLogger("bitune_jax")
  ours.addHandler(handler)
  ours.setLevel(py_logging.INFO)
  ours.propagate = False
  # Imported after flag parsing so that --help is quick.
  from bitune_jax import train  # pylint: disable=g-import-not-at-top
  workdir = flags.FLAGS.workdir  # a local path or a URL (gs://...) on a TPU pod
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  _, summary = train.train_and_evaluate(flags.FLAGS.config, workdir)
  print(json.dumps(summary, indent=2))
  if "top1" in summary:
    print(f"test top-1 {summary['top1']:.4f}, mean per-class accuracy "
          f"{summary['mean_class_acc']:.4f} (summary in {workdir}/summary.json)")
  else:  # trained without labels: the feature protocols
    print(f"test top-5 retrieval {summary['retrieval_top5']:.4f}, k-means BCubed "
          f"precision {summary['kmeans_bcubed_precision']:.4f}, linear probe top-1 "
          f"{summary['linear_probe_top1']:.4f} (summary in {workdir}/summary.json)")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
