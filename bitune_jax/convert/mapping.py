"""torchvision-style ResNet/DenseNet checkpoints of supervised and self-supervised
pre-training -> Flax variables.

Sources are told apart by their key layout, after DataParallel's `module.` prefix:

  kind            backbone under   projector (-> models.Projector)   dropped
  supervised      (top)            - (`fc`/`classifier`: source head) -
  moco_v1/v2      encoder_q.       encoder_q.fc / .fc.{0,2}           encoder_k., queue(_ptr)
  moco_v3         base_encoder.    base_encoder.fc.{0,1,3,4} (BN MLP) momentum_encoder.,
                                                                      predictor.
  swav            (top)            projection_head.{0,1,3} (BN MLP)   prototypes.weight
  deepcluster_v2  (top)            projection_head.{0,1,3} (BN MLP)   prototypes.prototypesN.
  insdisc         (top)            fc, Linear(F, 128)                 the `lemniscate` entry

(SimCLR, DINO, Barlow Twins and timm files are "supervised": torchvision names, with or
without `fc`; CMC's two-branch `l_to_ab.`/`ab_to_l.` files are refused, saying why.) Strict by construction: the target is the Flax variable tree of
`create_backbone(arch)` (and of the `models.Projector` the head needs), shapes only,
from `jax.eval_shape`; every tensor of the checkpoint is either mapped onto exactly one
target leaf with its shape checked, or deliberately dropped (a source's other networks,
queues and prototypes; BatchNorm's `num_batches_tracked`; training metadata; pickled
objects of unknown classes) and reported, or it is an error. Every target leaf must be
filled.

Layouts: conv OIHW -> HWIO; Linear `[out, in]` -> Dense kernel `[in, out]`; BatchNorm
weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bitune_jax import models

_HEAD = {"densenet121": "classifier"}  # torchvision's name of the final Linear


class ConversionError(ValueError):
  """The checkpoint does not fit the requested architecture."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where one source keeps its tensors (names after DataParallel's `module.`).

  marker: a regex that some tensor name matches (or, with `entry`, the name of a
  top-level checkpoint entry) for this layout to be detected. backbone: the prefix of
  the backbone's (and head's) names; head: the module of the projector (or classifier)
  under it, None for the arch's own classifier name. dropped: (name prefix, what it is)
  of the tensors left out. projectors: (kind, {torch module: Projector role}), the
  head layouts accepted, tried in order; empty for a classifier head.
  """
  kind: str
  name: str
  marker: str = ""
  entry: bool = False
  backbone: str = ""
  head: str | None = None
  dropped: tuple[tuple[str, str], ...] = ()
  projectors: tuple[tuple[str, dict[str, str]], ...] = ()


# SwAV's resnet50 (also DeepCluster-v2's): hidden_mlp > 0, or a single Linear when 0.
_SWAV_HEADS = ({"projection_head.0": "hidden", "projection_head.1": "hidden_bn",
                "projection_head.3": "out"}, {"projection_head": "out"})
# Detection order: the first layout whose marker matches.
LAYOUTS = (
    Layout("moco_v3", "MoCo v3", r"base_encoder\.", backbone="base_encoder.", head="fc",
           dropped=(("momentum_encoder.", "MoCo v3 momentum encoder"),
                    ("predictor.", "MoCo v3 predictor")),
           projectors=(("moco_v3", {"fc.0": "hidden", "fc.1": "hidden_bn", "fc.3": "out",
                                    "fc.4": "out_bn"}),)),
    Layout("moco", "MoCo", r"encoder_q\.", backbone="encoder_q.", head="fc",
           dropped=(("encoder_k.", "MoCo key encoder"), ("queue", "MoCo queue")),
           projectors=(("moco_v1", {"fc": "out"}),
                       ("moco_v2", {"fc.0": "hidden", "fc.2": "out"}))),
    Layout("swav", "SwAV", r"prototypes\.weight$", head="projection_head",
           dropped=(("prototypes.", "SwAV prototypes"),),
           projectors=tuple(("swav", h) for h in _SWAV_HEADS)),
    Layout("deepcluster_v2", "DeepCluster-v2", r"prototypes\.prototypes\d+\.weight$",
           head="projection_head",
           dropped=(("prototypes.", "DeepCluster-v2 prototypes"),),
           projectors=tuple(("deepcluster_v2", h) for h in _SWAV_HEADS)),
    Layout("insdisc", "InsDisc", "lemniscate", entry=True, head="fc",
           projectors=(("insdisc", {"fc": "out"}),)),
)
SUPERVISED = Layout("supervised", "supervised")
# Layouts recognised in order to say why they are not converted.
_UNSUPPORTED = (
    (r"(l_to_ab|ab_to_l)\.", "a CMC checkpoint (two ResNets, `l_to_ab` on the L and "
     "`ab_to_l` on the ab channels of Lab images, features concatenated) is not "
     "supported: bitune_jax has no two-branch backbone nor Lab input pipeline; use a "
     "single-branch source (e.g. InsDisc, MoCo, SwAV) instead"),)


def detect_layout(state_dict: Mapping[str, np.ndarray], checkpoint: Any) -> Layout:
  """The first of `LAYOUTS` whose marker matches, else `SUPERVISED`."""
  outer = _outer(state_dict)
  names = [k[len(outer):] for k in state_dict]
  for marker, why in _UNSUPPORTED:
    if any(re.match(marker, n) for n in names):
      raise ConversionError(why)
  entries = list(checkpoint) if isinstance(checkpoint, dict) else []
  for layout in LAYOUTS:
    if layout.entry:
      found = layout.marker in entries
    else:
      found = any(re.match(layout.marker, n) for n in names)
    if found:
      return layout
  return SUPERVISED


def _outer(state_dict):
  """DataParallel's `module.` when every name has it, else ''."""
  return "module." if state_dict and all(k.startswith("module.") for k in state_dict) else ""


def split_state_dict(state_dict: Mapping[str, np.ndarray],
                     layout: Layout) -> tuple[dict[str, np.ndarray], list[str]]:
  """`(tensors, dropped)`: the backbone's and head's tensors, prefix-stripped, and report
  lines for the tensors the layout leaves out. Any other tensor is an error."""
  tensors, groups, unknown = {}, {}, []
  outer = _outer(state_dict)
  for name, value in state_dict.items():
    key = name[len(outer):]
    what = next((w for prefix, w in layout.dropped if key.startswith(prefix)), None)
    if what is not None:
      groups.setdefault(what, []).append(name)
    elif key.startswith(layout.backbone):
      tensors[key[len(layout.backbone):]] = value
    else:
      unknown.append(name)
  if unknown:
    expected = ", ".join(repr(outer + p) for p in
                         [layout.backbone, *(p for p, _ in layout.dropped)])
    raise ConversionError(f"{layout.name} checkpoint has tensors outside {expected}: "
                          f"{unknown[:5]}")
  dropped = []
  for what, names in groups.items():
    dropped += _summarise(names, what) if len(names) > 1 else [f"{names[0]} ({what})"]
  return tensors, dropped


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
    arch: str, tensors: Mapping[str, np.ndarray], *, head: str | None = None,
    source: str = "checkpoint", allow_unused: bool = False
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], list[str]]:
  """`(variables, heads, report_lines)` from prefix-stripped torchvision-style tensors.

  heads: the tensors of module `head` (default: the arch's classifier, `fc` or
  `classifier`) and its submodules, left for the caller, `{torch module: {param: array}}`.
  source: how errors name the checkpoint (e.g. "MoCo v3 checkpoint").
  """
  target = backbone_target(arch)
  heads, dropped, mapped = {}, [], []
  head_name = head or _HEAD.get(arch, "fc")
  for name, value in tensors.items():
    name = _normalise_name(name)
    module, _, param = name.rpartition(".")
    if module == head_name or module.startswith(head_name + "."):
      heads.setdefault(module, {})[param] = value
      continue
    leaf = _leaf(flax_path(arch, module), param, value, target)
    if leaf is None:
      dropped.append(name)
    else:
      mapped.append((name, value, *leaf))
  flat, unexpected = place(arch, mapped, target, allow_unused=allow_unused, source=source)
  variables = traverse_util.unflatten_dict(flat)
  report = _summarise(dropped, "BatchNorm num_batches_tracked buffers")
  if unexpected:
    report.append(f"{len(unexpected)} unused tensors (allowed): {unexpected[:5]}")
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}, heads, report


def place(arch: str, mapped: list[tuple[str, np.ndarray, tuple[str, ...], np.ndarray]],
          target: Mapping[tuple[str, ...], Any], *, allow_unused: bool, source: str,
          hint: str = "") -> tuple[dict[tuple[str, ...], np.ndarray], list[str]]:
  """`(flat, unexpected)`: each `(name, tensor, path, array)` of `mapped` put at its
  `path` of `target` (`{path: ShapeDtypeStruct}`) as float32, its shape checked; the
  names with no place in `target`. Raises ConversionError, saying everything that does
  not fit (and `hint`), when a shape differs, a target leaf stays empty, or (unless
  `allow_unused`) a tensor has no place."""
  flat, unexpected, mismatched = {}, [], []
  for name, value, path, array in mapped:
    if path not in target:
      unexpected.append(name)
    elif tuple(array.shape) != tuple(target[path].shape):
      mismatched.append(f"{name}: checkpoint {tuple(value.shape)} -> "
                        f"{tuple(array.shape)}, {arch} expects {tuple(target[path].shape)}")
    else:
      flat[path] = np.ascontiguousarray(array, dtype=np.float32)
  missing = ["/".join(p) for p in target if p not in flat]
  message = problems(arch, missing, [] if allow_unused else unexpected, mismatched, source)
  if message:
    raise ConversionError(message + hint)
  return flat, unexpected


def problems(arch: str, missing: list[str], unexpected: list[str], mismatched: list[str],
             source: str) -> str:
  """One error message for what does not fit (empty when everything does)."""
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
  what = ("a timm, DeiT, DINO, MAE, CLIP or DINOv2 ViT" if models.is_vit(arch) else
          "a torchvision-style ResNet/DenseNet, or a MoCo, MoCo v3, SwAV, DeepCluster-v2 "
          "or InsDisc checkpoint of one")
  return (f"{source} does not match arch {arch!r}: " + " | ".join(lines)
          + f". Check --arch (and that this is {what}).")


def map_heads(
    layout: Layout, heads: dict[str, dict[str, np.ndarray]], *, num_features: int
) -> tuple[str, dict[str, np.ndarray] | None, dict[str, Any] | None, list[str]]:
  """`(kind, source_head, projector, report_lines)` from the head's tensors.

  Supervised: the classifier becomes the source head (Co-Tuning needs it). The others:
  the first of `layout.projectors` whose modules are exactly the head's gives the kind
  and the projector, `{"params", "batch_stats", "config"}` (config: the fields of
  `models.Projector`, batch_stats empty without BatchNorm).
  """
  names = sorted(heads)
  if layout.projectors:
    for kind, roles in layout.projectors:
      if sorted(roles) == names:
        projector, notes = _projector(layout, kind, roles, heads, num_features)
        return kind, None, projector, [f"projector from {layout.name} head "
                                       f"({', '.join(names)})"] + notes
    expected = " or ".join(repr(sorted(r)) for _, r in layout.projectors)
    raise ConversionError(f"unrecognised {layout.name} head {names}: expected {expected}")
  if not names:
    return layout.kind, None, None, ["no classifier head in the checkpoint (headless "
                                     "backbone)"]
  if len(names) != 1:
    raise ConversionError(f"unrecognised classifier head {names}")
  source_head = dense(names[0], heads[names[0]], bias=True)
  if source_head["kernel"].shape[0] != num_features:
    raise ConversionError(
        f"classifier {names[0]!r} takes {source_head['kernel'].shape[0]} features; the "
        f"backbone gives {num_features}")
  return layout.kind, source_head, None, [
      f"source head from {names[0]!r}: {source_head['kernel'].shape[1]} classes"]


def dense(module: str, params: Mapping[str, np.ndarray], *,
          bias: bool) -> dict[str, np.ndarray]:
  """A torch Linear's tensors -> Dense params (kernel `[in, out]`)."""
  if set(params) != ({"weight", "bias"} if bias else {"weight"}) or params["weight"].ndim != 2:
    raise ConversionError(f"head {module!r} is not a Linear layer "
                          f"{'with' if bias else 'without'} bias: {sorted(params)}")
  out = {"kernel": np.ascontiguousarray(params["weight"].T, np.float32)}
  if bias:
    out["bias"] = np.asarray(params["bias"], np.float32)
  return out


def _batch_norm(module, params):
  """A torch BatchNorm1d's tensors -> (params, batch_stats, notes); affine=False (no
  weight, bias) gives scale 1 and bias 0, which apply the same normalisation."""
  affine = {"weight", "bias"} <= set(params)
  expected = {"running_mean", "running_var", "num_batches_tracked"} | (
      {"weight", "bias"} if affine else set())
  if not {"running_mean", "running_var"} <= set(params) <= expected:
    raise ConversionError(f"head {module!r} is not a BatchNorm layer: {sorted(params)}")
  mean = np.asarray(params["running_mean"], np.float32)
  stats = {"mean": mean, "var": np.asarray(params["running_var"], np.float32)}
  if affine:
    return ({"scale": np.asarray(params["weight"], np.float32),
             "bias": np.asarray(params["bias"], np.float32)}, stats, [])
  return ({"scale": np.ones_like(mean), "bias": np.zeros_like(mean)}, stats,
          [f"{module} is BatchNorm1d(affine=False): stored with scale 1 and bias 0"])


def _projector(layout, kind, roles, heads, num_features):
  """The projector of `roles` ({torch module: Projector role}), checked against the
  variables of the `models.Projector` it configures."""
  linears = [m for m, r in roles.items() if r in ("hidden", "out")]
  use_bias = all("bias" in heads[m] for m in linears)
  params, stats, notes = {}, {}, []
  for module, role in roles.items():
    if role in ("hidden", "out"):
      params[role] = dense(module, heads[module], bias=use_bias)
    else:
      params[role], stats[role], note = _batch_norm(module, heads[module])
      notes += note
  counters = [m for m, r in roles.items() if "num_batches_tracked" in heads[m]]
  if counters:
    notes.append(f"{len(counters)} BatchNorm num_batches_tracked buffers of the projector "
                 f"({', '.join(counters)})")
  config = {"dim": int(params["out"]["kernel"].shape[1]),
            "hidden_dim": int(params["hidden"]["kernel"].shape[1]) if "hidden" in params
                          else None,
            "use_bias": use_bias, "hidden_bn": "hidden_bn" in params,
            "out_bn": "out_bn" in params}
  target = traverse_util.flatten_dict(jax.eval_shape(
      models.Projector(**config).init, jax.random.PRNGKey(0),
      jnp.zeros((1, num_features), jnp.float32)))
  got = traverse_util.flatten_dict({"params": params, "batch_stats": stats})
  wrong = [f"{'/'.join(p)} {got[p].shape if p in got else None}, expected "
           f"{tuple(target[p].shape)}" for p in target
           if p not in got or tuple(got[p].shape) != tuple(target[p].shape)]
  if wrong or set(got) - set(target):
    raise ConversionError(f"{layout.name} projector ({', '.join(sorted(roles))}) does not "
                          f"fit the backbone's {num_features} features: {wrong[:3]}")
  return {"params": params, "batch_stats": stats, "config": config}, notes
