"""PyTorch checkpoints (torchvision ResNet/DenseNet, MoCo v1/v2) -> Flax variables.

    result = convert_checkpoint("resnet50.pth", arch="resnet50")
    result["backbone"]      # {"params", "batch_stats"} for models.create_backbone(arch)
    result["source_head"]   # {"kernel" [F, C_s], "bias" [C_s]} (supervised checkpoints)
    result["projector"]     # params of models.Projector (MoCo checkpoints)
    result["report"]        # what was read, mapped and dropped

The reader never executes pickled code and does not need PyTorch (`reader.py`).
`bitune-convert SRC DST --arch resnet50` writes the result to one self-describing
`.npz` file (source sha256, arch, report) that `load_converted(DST)` reads back.
"""

import os
from typing import Any

from bitune_jax.convert.mapping import ConversionError
from bitune_jax.convert.output import load_converted, save_converted, sha256_of
from bitune_jax.convert.reader import CheckpointError, UnsafeCheckpointError
from bitune_jax.convert.reader import read_checkpoint
from bitune_jax.convert import mapping
from bitune_jax import models

__all__ = ["CheckpointError", "ConversionError", "UnsafeCheckpointError",
           "convert_checkpoint", "load_converted", "save_converted"]


def convert_checkpoint(path: str | os.PathLike, *, arch: str,
                       allow_unused: bool = False) -> dict[str, Any]:
  """Reads and maps a checkpoint; see the module docstring for the result.

  Args:
    path: a torch `.pth`/`.pth.tar` (zip or legacy format), `.safetensors` or `.npz`.
    arch: one of `models.ARCHS`.
    allow_unused: tolerate checkpoint tensors the architecture has no place for
      (reported); by default they are an error, as they usually mean a wrong `arch`.

  Raises:
    CheckpointError: unreadable, truncated or unsafe file.
    ConversionError: the tensors do not fit `arch`.
  """
  if arch not in models.ARCHS:
    raise ConversionError(f"unknown arch {arch!r}; expected one of {', '.join(models.ARCHS)}")
  obj, fmt = read_checkpoint(path)
  state_dict, dropped = mapping.find_state_dict(obj)
  kind, tensors, moco_dropped = mapping.strip_prefix(state_dict)
  backbone, heads, backbone_report = mapping.map_backbone(arch, tensors,
                                                          allow_unused=allow_unused)
  kind, source_head, projector, head_report = mapping.map_heads(
      kind, heads, num_features=models.num_features(arch))
  num_params = sum(int(v.size) for v in _leaves(backbone["params"]))
  report = {
      "format": fmt, "arch": arch, "kind": kind, "backbone_parameters": num_params,
      "notes": head_report + backbone_report,
      "dropped": dropped + moco_dropped,
  }
  result = {"backbone": backbone, "report": report}
  if source_head is not None:
    result["source_head"] = source_head
  if projector is not None:
    result["projector"] = projector
  return result


def _leaves(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _leaves(value)
  else:
    yield tree
