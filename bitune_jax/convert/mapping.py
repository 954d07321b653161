"""torchvision ResNet/DenseNet and MoCo v1/v2 state_dicts -> Flax variables.

Strict by construction: the target is the Flax variable tree of `create_backbone(arch)`
(shapes only, from `jax.eval_shape`); every tensor of the checkpoint is either mapped
onto exactly one target leaf with its shape checked, or deliberately dropped (MoCo's key
encoder, queue and pointer; BatchNorm's `num_batches_tracked`; training metadata) and
reported, or it is an error. Every target leaf must be filled.

Layouts: conv OIHW -> HWIO; Linear `[out, in]` -> Dense kernel `[in, out]`; BatchNorm
weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var.
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bitune_jax import models

MOCO_PREFIXES = ("module.encoder_q.", "encoder_q.")
_MOCO_DROPPED = ("module.encoder_k.", "encoder_k.", "module.queue", "queue")
_HEAD = {"densenet121": "classifier"}  # torchvision's name of the final Linear


class ConversionError(ValueError):
  """The checkpoint does not fit the requested architecture."""


def find_state_dict(obj: Any) -> tuple[dict[str, np.ndarray], list[str]]:
  """`(state_dict, dropped)`: the tensors of a checkpoint object, and what else it held.

  Accepts a flat state_dict or a dict holding one under `state_dict` / `model` (the
  others, e.g. epoch, arch, optimizer, are reported as dropped).
  """
  if not isinstance(obj, dict):
    raise ConversionError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
  if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
    return obj, []
  for key in ("state_dict", "model"):
    inner = obj.get(key)
    if isinstance(inner, dict) and inner and all(
        isinstance(v, np.ndarray) for v in inner.values()):
      return inner, [f"{k} (checkpoint metadata)" for k in obj if k != key]
  raise ConversionError(
      "no state_dict found: expected a dict of tensors, or one under 'state_dict' or "
      f"'model'; top-level keys: {sorted(map(str, obj))[:10]}")


def strip_prefix(
    state_dict: Mapping[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray], list[str]]:
  """`(kind, tensors, dropped)`: detects MoCo and DataParallel prefixes.

  kind is 'moco' (keys under `[module.]encoder_q.`) or 'supervised'.
  """
  for prefix in MOCO_PREFIXES:
    if any(k.startswith(prefix) for k in state_dict):
      tensors, dropped, unknown = {}, [], []
      for name, value in state_dict.items():
        if name.startswith(prefix):
          tensors[name[len(prefix):]] = value
        elif name.startswith(_MOCO_DROPPED):
          dropped.append(name)
        else:
          unknown.append(name)
      if unknown:
        raise ConversionError(f"MoCo checkpoint has tensors outside {prefix!r}, the key "
                              f"encoder and the queue: {unknown[:5]}")
      key_encoder = [n for n in dropped if "encoder_k." in n]
      others = [f"{n} (MoCo queue)" for n in dropped if "encoder_k." not in n]
      return "moco", tensors, _summarise(key_encoder, "MoCo key encoder") + others
  if state_dict and all(k.startswith("module.") for k in state_dict):
    return "supervised", {k[len("module."):]: v for k, v in state_dict.items()}, []
  return "supervised", dict(state_dict), []


def _summarise(names, what):
  return [f"{len(names)} tensors of the {what} (e.g. {names[0]})"] if names else []


def backbone_target(arch: str) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Flat `{(collection, *path): ShapeDtypeStruct}` of `create_backbone(arch)`."""
  model = models.create_backbone(arch)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 64, 64, 3), jnp.float32))
  return traverse_util.flatten_dict(dict(shapes))


def flax_path(arch: str, module: str) -> tuple[str, ...]:
  """torchvision module name -> Flax module path (tuple), e.g.
  'layer2.0.downsample.1' -> ('layer2_0', 'downsample_bn')."""
  if arch == "densenet121":
    module = module.removeprefix("features.")
  module = re.sub(r"^layer(\d+)\.(\d+)\.", r"layer\1_\2.", module)
  module = module.replace("downsample.0", "downsample_conv").replace(
      "downsample.1", "downsample_bn")
  return tuple(module.split("."))


def _normalise_name(name):
  """Old torchvision DenseNet files say `norm.1`, `conv.2`; new ones `norm1`, `conv2`."""
  return re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", name)


def _leaf(module_path, param, value, target):
  """(collection path, array) for one tensor, or None when it is to be dropped."""
  if param == "num_batches_tracked":
    return None
  is_bn = ("params", *module_path, "scale") in target
  if param == "weight":
    if is_bn:
      return ("params", *module_path, "scale"), value
    if value.ndim == 4:
      return ("params", *module_path, "kernel"), np.transpose(value, (2, 3, 1, 0))
    return ("params", *module_path, "kernel"), value.T
  if param == "bias":
    return ("params", *module_path, "bias"), value
  if param in ("running_mean", "running_var") and is_bn:
    return ("batch_stats", *module_path, param.removeprefix("running_")), value
  return ("unknown", *module_path, param), value


def map_backbone(
    arch: str, tensors: Mapping[str, np.ndarray], *, allow_unused: bool = False
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], list[str]]:
  """`(variables, heads, report_lines)` from prefix-stripped torchvision-style tensors.

  heads: the final Linear(s) left for the caller, `{torch module name: {param: array}}`.
  """
  target = backbone_target(arch)
  flat, heads, dropped, unexpected, mismatched = {}, {}, [], [], []
  head_name = _HEAD.get(arch, "fc")
  for name, value in tensors.items():
    name = _normalise_name(name)
    module, _, param = name.rpartition(".")
    if module == head_name or module.startswith(head_name + "."):
      heads.setdefault(module, {})[param] = value
      continue
    mapped = _leaf(flax_path(arch, module), param, value, target)
    if mapped is None:
      dropped.append(name)
      continue
    path, array = mapped
    if path not in target:
      unexpected.append(name)
    elif tuple(array.shape) != tuple(target[path].shape):
      mismatched.append(f"{name}: checkpoint {tuple(value.shape)} -> "
                        f"{tuple(array.shape)}, {arch} expects {tuple(target[path].shape)}")
    else:
      flat[path] = np.ascontiguousarray(array, dtype=np.float32)
  missing = ["/".join(p) for p in target if p not in flat]
  problems = _problems(arch, missing, unexpected if not allow_unused else [], mismatched)
  if problems:
    raise ConversionError(problems)
  variables = traverse_util.unflatten_dict(flat)
  report = _summarise(dropped, "BatchNorm num_batches_tracked buffers")
  if unexpected:
    report.append(f"{len(unexpected)} unused tensors (allowed): {unexpected[:5]}")
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}, heads, report


def _problems(arch, missing, unexpected, mismatched):
  lines = []
  if mismatched:
    lines.append(f"{len(mismatched)} shape mismatches, e.g. " + "; ".join(mismatched[:3]))
  if missing:
    lines.append(f"{len(missing)} {arch} variables not in the checkpoint, e.g. "
                 + ", ".join(missing[:5]))
  if unexpected:
    lines.append(f"{len(unexpected)} checkpoint tensors {arch} has no place for, e.g. "
                 + ", ".join(unexpected[:5]))
  if not lines:
    return ""
  return (f"checkpoint does not match arch {arch!r}: " + " | ".join(lines)
          + ". Check --arch (and that this is a torchvision-style ResNet/DenseNet or "
          "MoCo checkpoint).")


def map_heads(
    kind: str, heads: dict[str, dict[str, np.ndarray]], *, num_features: int
) -> tuple[str, dict[str, np.ndarray] | None, dict[str, dict[str, np.ndarray]] | None,
           list[str]]:
  """`(source_head, projector, report_lines)` from the final Linear(s).

  Supervised: the classifier becomes the source head (Co-Tuning needs it). MoCo v1: its
  Linear becomes the projector's `out`; MoCo v2: `fc.0`/`fc.2` its `hidden`/`out`.
  """
  def dense(module):
    params = heads.pop(module)
    if set(params) != {"weight", "bias"} or params["weight"].ndim != 2:
      raise ConversionError(f"head {module!r} is not a Linear layer: {sorted(params)}")
    return {"kernel": np.ascontiguousarray(params["weight"].T, np.float32),
            "bias": np.asarray(params["bias"], np.float32)}

  source_head = projector = None
  report = []
  names = sorted(heads)
  if kind == "moco":
    if names == ["fc.0", "fc.2"]:
      projector = {"hidden": dense("fc.0"), "out": dense("fc.2")}
      kind = "moco_v2"
    elif names == ["fc"]:
      projector = {"out": dense("fc")}
      kind = "moco_v1"
    else:
      raise ConversionError(f"unrecognised MoCo head {names}: expected 'fc' (v1) or "
                            "'fc.0', 'fc.2' (v2)")
    first = projector.get("hidden", projector["out"])
    if first["kernel"].shape[0] != num_features or ("hidden" in projector and (
        projector["out"]["kernel"].shape[0] != first["kernel"].shape[1])):
      raise ConversionError(f"MoCo projector ({names}) does not fit the backbone's "
                            f"{num_features} features")
    report.append(f"projector from MoCo head ({', '.join(names)})")
  elif names:
    if len(names) != 1:
      raise ConversionError(f"unrecognised classifier head {names}")
    source_head = dense(names[0])
    if source_head["kernel"].shape[0] != num_features:
      raise ConversionError(
          f"classifier {names[0]!r} takes {source_head['kernel'].shape[0]} features; the "
          f"backbone gives {num_features}")
    report.append(f"source head from {names[0]!r}: {source_head['kernel'].shape[1]} classes")
  else:
    report.append("no classifier head in the checkpoint (headless backbone)")
  return kind, source_head, projector, report
