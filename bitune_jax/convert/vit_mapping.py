"""Vision Transformer checkpoints -> the variables of `models.vit.ViT`.

Sources, told apart by their keys (after DataParallel's `module.`):

  kind     keys                                   kept             dropped (reported)
  timm     cls_token, blocks.{i}.attn.qkv, norm   the ViT; `head`  -
           (timm, augreg, DeiT, DINO's             as source head
           backbone-only files)
  mae      + decoder_embed, decoder_*             the encoder      the decoder, mask_token
  dinov2   + ls1.gamma / register_tokens,         the ViT,         mask_token
           mask_token [1, D]                      registers
  clip     visual.conv1, visual.class_embedding,  visual.*         the text tower,
           visual.transformer.resblocks.{i}                        logit_scale

Every name is first rewritten to timm's (CLIP's `transformer.resblocks.{i}.ln_1` ->
`blocks.{i}.norm1`, `attn.in_proj_weight` -> `attn.qkv.weight`, whose rows are q, k, v
as timm's fused qkv's; `class_embedding` -> `cls_token`; DINOv2's chunked
`blocks.{c}.{i}.` -> `blocks.{i}.`), then mapped: Linear `[out, in]` -> Dense kernel
`[in, out]`, the patch conv OIHW -> HWIO, LayerNorm weight -> scale, `ls{1,2}.gamma` ->
`ls{1,2}`, CLIP's `proj` `[D, P]` as it is (CLIP multiplies `x @ proj`). Strict as the
ResNet mapping: every tensor is mapped with its shape checked or dropped and reported,
every target leaf is filled. Half-precision tensors become float32.
"""

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from bitune_jax.convert import mapping

# (pattern, replacement) applied in order to CLIP's visual names (after `visual.`).
_CLIP_NAMES = (
    (r"^conv1\.", "patch_embed.proj."),
    (r"^class_embedding$", "cls_token"),
    (r"^positional_embedding$", "pos_embed"),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
    (r"^ln_post\.", "norm."),
)
_TIMM_NAMES = (
    (r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),  # DINOv2's block chunks
    (r"^(reg_token|register_tokens)$", "reg_tokens"),
)
# Names that mean a ViT this project does not build, and why.
_REFUSED = (
    (r"^(dist_token|head_dist\.)", "a distilled DeiT (its `dist_token` is a second class "
     "token the features depend on): use the non-distilled DeiT checkpoint"),
    (r"^fc_norm\.", "a ViT pooled by averaging the patch tokens (`fc_norm`): the ViTs "
     "here pool the class token"),
)


def looks_like_vit(state_dict: Mapping[str, np.ndarray]) -> bool:
  """Whether the tensors are a Vision Transformer's (any of the sources above)."""
  names = {k.removeprefix("module.") for k in state_dict}
  return bool(names & {"cls_token", "visual.class_embedding", "class_embedding"})


def detect(names: set[str]) -> str:
  """The source kind of a ViT state dict's (prefix-stripped) names."""
  if "visual.class_embedding" in names or "class_embedding" in names:
    return "clip"
  if any(n.startswith("decoder_") for n in names):
    return "mae"
  if "register_tokens" in names or any(re.search(r"\.ls1\.gamma$", n) for n in names) or (
      "mask_token" in names):
    return "dinov2"
  return "timm"


def _split(kind, tensors):
  """`(kept, dropped lines)`: the ViT's tensors (timm names) and what the source's other
  networks held."""
  kept, dropped = {}, {}
  for name, value in tensors.items():
    if kind == "clip":
      if not name.startswith("visual.") and "class_embedding" not in tensors:
        dropped.setdefault("CLIP text tower", []).append(name)
        continue
      name = name.removeprefix("visual.")
      for pattern, repl in _CLIP_NAMES:
        name = re.sub(pattern, repl, name)
    elif kind == "mae" and (name.startswith("decoder_") or name == "mask_token"):
      dropped.setdefault("MAE decoder", []).append(name)
      continue
    elif kind == "dinov2" and name == "mask_token":
      dropped.setdefault("DINOv2 mask token (masked-image pre-training only)", []).append(
          name)
      continue
    for pattern, repl in _TIMM_NAMES:
      name = re.sub(pattern, repl, name)
    kept[name] = value
  lines = [f"{len(v)} tensors of the {w} (e.g. {v[0]})" if len(v) > 1 else f"{v[0]} ({w})"
           for w, v in dropped.items()]
  return kept, lines


def _leaf(name, value, target):
  """`(flax path, array)` for one timm-named tensor, or `(None, name)` unplaced."""
  module, _, param = name.rpartition(".")
  path = tuple(re.sub(r"^blocks\.(\d+)", r"blocks_\1", module).replace(
      "patch_embed.proj", "patch_embed").split(".")) if module else ()
  if not module:  # cls_token, pos_embed, reg_tokens, proj: reshaped to the target
    key = ("params", param)
    if key in target and value.size == np.prod(target[key].shape):
      return key, value.reshape(target[key].shape)
    return key, value
  if param == "gamma":
    return ("params", *path), value
  if param == "weight":
    if ("params", *path, "scale") in target:
      return ("params", *path, "scale"), value
    if value.ndim == 4:
      return ("params", *path, "kernel"), np.transpose(value, (2, 3, 1, 0))
    return ("params", *path, "kernel"), value.T
  return ("params", *path, param), value


def map_vit(arch: str, state_dict: Mapping[str, np.ndarray], *,
            allow_unused: bool = False) -> tuple[str, dict[str, Any], Any, list[str],
                                                 list[str]]:
  """`(kind, backbone, source_head, notes, dropped)` of a ViT state dict for `arch`.

  backbone: `{"params": ..., "batch_stats": {}}`; source_head: `{"kernel", "bias"}` of
  timm's classifier `head`, or None."""
  outer = "module." if all(k.startswith("module.") for k in state_dict) else ""
  tensors = {k[len(outer):]: v for k, v in state_dict.items()}
  for pattern, why in _REFUSED:
    if any(re.match(pattern, n) for n in tensors):
      raise mapping.ConversionError(f"this checkpoint is {why}")
  kind = detect(set(tensors))
  kept, dropped = _split(kind, tensors)
  head = {k.removeprefix("head."): kept.pop(k) for k in list(kept) if k.startswith("head.")}
  target = mapping.backbone_target(arch)
  mapped = [(name, value, *_leaf(name, value, target)) for name, value in kept.items()]
  flat, unexpected = mapping.place(arch, mapped, target, allow_unused=allow_unused,
                                   source=f"{kind} ViT checkpoint",
                                   hint=_hint(kind, tensors, arch))
  notes = [f"{len(kept) - len(unexpected)} tensors of a {kind} ViT mapped onto {arch}"]
  if unexpected:
    notes.append(f"{len(unexpected)} unused tensors (allowed): {unexpected[:5]}")
  source_head = None
  if head:
    source_head = mapping.dense("head", head, bias=True)
    width = target[("params", "norm", "scale")].shape[0]
    if source_head["kernel"].shape[0] != width:
      raise mapping.ConversionError(f"classifier 'head' takes {source_head['kernel'].shape[0]}"
                                    f" features; {arch} gives {width}")
    notes.append(f"source head from 'head': {source_head['kernel'].shape[1]} classes")
  elif kind != "clip":
    notes.append("no classifier head in the checkpoint (headless backbone)")
  halves = sorted({str(v.dtype) for v in state_dict.values()} - {"float32"})
  if halves:
    notes.append(f"{', '.join(halves)} tensors read as float32")
  params = traverse_util.unflatten_dict(flat)["params"]
  return kind, {"params": params, "batch_stats": {}}, source_head, notes, dropped


def _hint(kind, tensors, arch):
  """What arch the checkpoint's shapes suggest, when they do not fit `arch`."""
  regs = tensors.get("register_tokens", tensors.get("reg_token"))
  if kind == "dinov2" and regs is not None and "_reg" not in arch:
    return f" It has {regs.shape[1]} register tokens: use a `_reg{regs.shape[1]}` arch."
  width = next((v.shape[-1] for k, v in tensors.items()
                if k.endswith(("cls_token", "class_embedding"))), None)
  return f" (The checkpoint's width is {width}.)" if width else ""
