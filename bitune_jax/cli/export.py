"""`bitune-export --workdir DIR [--which latest|best] OUT.npz`: a fine-tuned model in the
converter's format.

The file holds the backbone (params and BatchNorm statistics), the classifier `head`
(and the `projector` / `source_head` where the method has them) and, in its report,
what `bitune_jax.inference` needs to use it: arch, classes and their names (as the
dataset names them: "5".."9" for the digits demo), dataset, image size and the
preprocessing the model was trained with. `init_from` loads it like a converted
PyTorch checkpoint (the backbone; a new head).
"""

import argparse
import json
import os
import sys

from bitune_jax.cli import console
from bitune_jax.cli import eval as eval_cli

# jax and the training system are imported where they are used (quick --help).
# pylint: disable=g-import-not-at-top


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="bitune-export", description="Write a fine-tuned model (backbone, heads, "
      "preprocessing) in the converter's .npz format, for init_from and "
      "bitune_jax.inference.")
  parser.add_argument("out", help="the output file (.npz)")
  parser.add_argument("--workdir", required=True, help="a bitune-train workdir")
  parser.add_argument("--which", choices=eval_cli.WHICH, type=eval_cli.which_checkpoint,
                      default="latest",
                      help="the checkpoint to export: the last one saved, or the one with "
                           "the best evaluation (as bitune-eval; 'final' is latest)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing output file")
  console.add_version(parser)
  args = parser.parse_args(argv)
  from bitune_jax.training import config_base
  from bitune_jax.training import export
  try:
    report = export.export_workdir(os.path.abspath(config_base.expand_path(args.workdir)),
                            config_base.expand_path(args.out),
                            which=eval_cli.which_checkpoint(args.which),
                            overwrite=args.overwrite)
  except (OSError, ValueError) as e:
    print(f"bitune-export: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({k: report[k] for k in ("arch", "kind", "num_classes", "dataset",
                                           "step", "checkpoint")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
