"""PyTorch checkpoints (torchvision ResNet/DenseNet, and the self-supervised MoCo v1/v2/v3,
SwAV, DeepCluster-v2 and InsDisc layouts of them; Vision Transformers of timm, DeiT, DINO,
MAE, OpenAI CLIP and DINOv2, see `vit_mapping`) -> Flax variables.

    result = convert_checkpoint("resnet50.pth", arch="resnet50")
    result["backbone"]      # {"params", "batch_stats"} for models.create_backbone(arch)
    result["source_head"]   # {"kernel" [F, C_s], "bias" [C_s]} (supervised checkpoints)
                            # (ViTs: "batch_stats" is empty)
    result["projector"]     # params of models.Projector(**report["projector_config"])
    result["projector_batch_stats"]  # its BatchNorm statistics (MoCo v3, SwAV, DC-v2)
    result["report"]        # kind (the detected source), what was read, mapped, dropped

The source is detected from the key layout (see `mapping`); a projector applies as
`models.Projector(**report["projector_config"]).apply({"params": result["projector"],
"batch_stats": result.get("projector_batch_stats", {})}, features)`.

The reader never executes pickled code and does not need PyTorch (`reader.py`).
`bitune-convert SRC DST --arch resnet50` writes the result to one self-describing
`.npz` file (source sha256, arch, report) that `load_converted(DST)` reads back.
"""

import os
from typing import Any

from bitune_jax.convert.mapping import ConversionError
from bitune_jax.convert.output import load_converted, save_converted, sha256_of
from bitune_jax.convert.reader import CheckpointError, ForeignObject
from bitune_jax.convert.reader import UnsafeCheckpointError, read_checkpoint
from bitune_jax.convert import contents, mapping, vit_mapping
from bitune_jax import models

__all__ = ["CheckpointError", "ConversionError", "ForeignObject", "UnsafeCheckpointError",
           "convert_checkpoint", "load_converted", "save_converted", "sha256_of"]


def convert_checkpoint(path: str | os.PathLike, *, arch: str,
                       allow_unused: bool = False) -> dict[str, Any]:
  """Reads and maps a checkpoint; see the module docstring for the result.

  Args:
    path: a torch `.pth`/`.pth.tar` (zip or legacy format), a TorchScript archive,
      `.safetensors` or `.npz`.
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
  state_dict, dropped = contents.find_state_dict(obj)
  vit = models.is_vit(arch)
  if vit_mapping.looks_like_vit(state_dict) != vit:
    held, wanted = ("a convolutional network", "a ViT") if vit else (
        "a Vision Transformer", "a ResNet/DenseNet")
    others = [a for a in models.ARCHS if models.is_vit(a) != vit]
    raise ConversionError(f"{os.fspath(path)} holds {held}, not {wanted} as --arch {arch} "
                          f"needs: choose --arch among {', '.join(others)}")
  if vit:
    kind, backbone, source_head, notes, more = vit_mapping.map_vit(
        arch, state_dict, allow_unused=allow_unused)
    return _result(fmt, arch, kind, backbone, notes, dropped + more, source_head)
  layout = mapping.detect_layout(state_dict, obj)
  tensors, layout_dropped = mapping.split_state_dict(state_dict, layout)
  source = "checkpoint" if layout is mapping.SUPERVISED else f"{layout.name} checkpoint"
  backbone, heads, backbone_report = mapping.map_backbone(
      arch, tensors, head=layout.head, source=source, allow_unused=allow_unused)
  kind, source_head, projector, head_report = mapping.map_heads(
      layout, heads, num_features=models.num_features(arch))
  result = _result(fmt, arch, kind, backbone, head_report + backbone_report,
                   dropped + layout_dropped, source_head)
  if projector is not None:
    result["projector"] = projector["params"]
    if projector["batch_stats"]:
      result["projector_batch_stats"] = projector["batch_stats"]
    result["report"]["projector_config"] = projector["config"]
  return result


def _result(fmt, arch, kind, backbone, notes, dropped, source_head):
  """The conversion's result (module docstring) without a projector."""
  num_params = sum(int(v.size) for v in _leaves(backbone["params"]))
  report = {"format": fmt, "arch": arch, "kind": kind, "backbone_parameters": num_params,
            "notes": notes, "dropped": dropped}
  result = {"backbone": backbone, "report": report}
  if source_head is not None:
    result["source_head"] = source_head
  return result


def _leaves(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _leaves(value)
  else:
    yield tree
