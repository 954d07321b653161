"""A trained state in the converter's format (`convert.save_converted`): what
`init_from` loads like a converted PyTorch checkpoint, and `bitune_jax.inference` uses.
The demo's source model, the k-shot protocol's backbone and `bitune-export` all write
through `save_model`."""

import os

import jax

from bitune_jax import convert
from bitune_jax.data.views import crop
from bitune_jax.training import loop, records


def save_model(path, state, *, arch, kind, notes, parts=(), report=None, source=None):
  """Writes the backbone of `state` (params and BatchNorm statistics) and its `parts`
  (`{name in the file: params path}`, e.g. `{"head": ("head", "dense")}`) to `path`.

  Args:
    path: the output `.npz`.
    state: a train state (any sharding: gathered here).
    arch: the backbone's architecture.
    kind: what trained it (a method, "supervised").
    notes: lines for the report.
    parts: `(name in the file, key path under params)` pairs; a part whose path the
      state lacks is left out.
    report: more fields of the report.
    source: what the file was made from (`convert.save_converted`).

  Returns:
    The file's report.
  """
  params, stats = jax.device_get((state.params, state.batch_stats))
  result = {"backbone": {"params": params["backbone"], "batch_stats": stats["backbone"]}}
  for name, keys in parts:
    value = params
    for key in keys:
      value = value.get(key) if isinstance(value, dict) else None
    if value is not None:
      result[name] = dict(value)
  result["report"] = {"format": "bitune_jax", "arch": arch, "kind": kind,
                      **(report or {}), "notes": list(notes), "dropped": []}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  convert.save_converted(result, path, source=source)
  return result["report"]


def preprocessing(config):
  """How the model's eval-mode inputs are made (see `bitune_jax.inference`)."""
  if config.dataset == "digits":
    return {"kind": "digits", "image_size": config.image_size}
  return {"kind": "imagenet", "image_size": config.image_size,
          "resize": crop.eval_resize(config.image_size),
          "mean": list(crop.MEAN_RGB), "std": list(crop.STD_RGB)}


def export_workdir(workdir, out, *, which="latest", overwrite=False):
  """Writes the `which` ('latest' checkpoint, or 'best') model of a bitune-train
  workdir to `out`: the backbone, the classifier `head` and the `projector` /
  `source_head` where the method has them. Returns the file's report."""
  if which not in loop.WHICH:
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  if os.path.exists(out) and not overwrite:
    raise ValueError(f"{out} exists; pass --overwrite to replace it")
  config = records.load_config(workdir)
  run, state, _ = loop.restore(workdir, config, which)
  step = int(state.step)
  return save_model(
      out, state, arch=config.arch, kind=config.method,
      notes=[f"exported from {workdir} ({which}, step {step})"],
      parts=(("head", ("head", "dense")), ("projector", ("projector",)),
             ("source_head", ("source_head",))),
      report={"num_classes": config.num_classes, "dataset": config.dataset,
              "class_names": list(run.data.class_names), "step": step,
              "checkpoint": which, "preprocessing": preprocessing(config),
              "feature_eval": run.method.evaluation == "features"},
      source=os.path.join(workdir, "config.json"))
