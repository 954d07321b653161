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

from bitune_jax import eval_main

# jax and the training system are imported where they are used (quick --help).
# pylint: disable=g-import-not-at-top


def preprocessing(config):
  """How the model's eval-mode inputs are made (see `bitune_jax.inference`)."""
  if config.dataset == "digits":
    return {"kind": "digits", "image_size": config.image_size}
  from bitune_jax.data.views import crop
  return {"kind": "imagenet", "image_size": config.image_size,
          "resize": crop.eval_resize(config.image_size),
          "mean": list(crop.MEAN_RGB), "std": list(crop.STD_RGB)}


def export_workdir(workdir, out, *, which="latest", overwrite=False):
  """Writes the `which` ('latest' checkpoint, or 'best'; bitune-eval's names) model of
  a bitune-train workdir to `out`. Returns the file's report."""
  which = eval_main.which_checkpoint(which)
  if which not in eval_main.WHICH:
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  if os.path.exists(out) and not overwrite:
    raise ValueError(f"{out} exists; pass --overwrite to replace it")
  import jax
  from bitune_jax import convert
  config = eval_main._load_config(workdir)  # pylint: disable=protected-access
  run, state, _ = eval_main._restore(workdir, config, which)  # pylint: disable=protected-access
  params, stats = jax.device_get((state.params, state.batch_stats))
  result = {"backbone": {"params": params["backbone"], "batch_stats": stats["backbone"]}}
  result["head"] = dict(params["head"]["dense"])
  for extra in ("projector", "source_head"):
    if extra in params:
      result[extra] = params[extra]
  result["report"] = {
      "format": "bitune_jax", "arch": config.arch, "kind": config.method,
      "num_classes": config.num_classes, "dataset": config.dataset,
      "class_names": list(run.data.class_names),
      "step": int(state.step), "checkpoint": which,
      "preprocessing": preprocessing(config),
      "feature_eval": bool(getattr(run.method, "FEATURE_EVAL", False)),
      "notes": [f"exported from {workdir} ({which}, step {int(state.step)})"],
      "dropped": []}
  folder = os.path.dirname(os.path.abspath(out))
  os.makedirs(folder, exist_ok=True)
  convert.save_converted(result, out, source=os.path.join(workdir, "config.json"))
  return result["report"]


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="bitune-export", description="Write a fine-tuned model (backbone, heads, "
      "preprocessing) in the converter's .npz format, for init_from and "
      "bitune_jax.inference.")
  parser.add_argument("out", help="the output file (.npz)")
  parser.add_argument("--workdir", required=True, help="a bitune-train workdir")
  parser.add_argument("--which", choices=eval_main.WHICH, type=eval_main.which_checkpoint,
                      default="latest",
                      help="the checkpoint to export: the last one saved, or the one with "
                           "the best evaluation (as bitune-eval; 'final' is latest)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing output file")
  eval_main.add_version(parser)
  args = parser.parse_args(argv)
  from bitune_jax import config_base
  try:
    report = export_workdir(os.path.abspath(config_base.expand_path(args.workdir)),
                            config_base.expand_path(args.out), which=args.which,
                            overwrite=args.overwrite)
  except (OSError, ValueError) as e:
    print(f"bitune-export: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({k: report[k] for k in ("arch", "kind", "num_classes", "dataset",
                                           "step", "checkpoint")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
