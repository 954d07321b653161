"""Converter on Vision Transformer checkpoints: timm (`.pth`, `.safetensors`), DeiT, DINO,
MAE, OpenAI CLIP (its state dict, and its TorchScript archive) and DINOv2, each a
PyTorch model written here in its project's exact names (third_party/vit_models.py)
with random weights, saved as its project saves it. Checked: the source detected from
the keys, the features (and timm's head) against PyTorch within 1e-4, what is dropped,
and, at the real sizes, that every tensor of each arch's checkpoint finds its place."""

import fakes
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import vit_models

from bitune_jax import convert, models
from bitune_jax.convert import vit_mapping
from bitune_jax.models import vit

RTOL = 1e-4
# Small ViTs of each family (4 x 4 patches, width 32): the real archs' flags (epsilon,
# CLIP's parts, LayerScale, DINOv2's offset, registers) at a size that runs in seconds.
TINY = dict(patch=4, width=32, depth=2, heads=4, mlp_dim=64, grid=4)
FAMILIES = {
    "tiny_timm": dict(vit.VARIANTS["vit_b16"], **TINY),
    "tiny_clip": dict(vit.VARIANTS["clip_vit_b16"], **dict(TINY, mlp_dim=128, proj_dim=16)),
    "tiny_dinov2": dict(vit.VARIANTS["dinov2_vit_s14"], **dict(TINY, grid=5)),
    "tiny_dinov2_reg4": dict(vit.VARIANTS["dinov2_vit_b14_reg4"], **dict(TINY, grid=5)),
}
TORCH = dict(patch=4, dim=32, depth=2, heads=4)


@pytest.fixture(autouse=True)
def _tiny_archs(monkeypatch):
  for name, variant in FAMILIES.items():
    monkeypatch.setitem(vit.VARIANTS, name, variant)
  monkeypatch.setattr(models, "ARCHS", models.ARCHS + tuple(FAMILIES))


def _close(actual, expected, what):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  error = float(np.abs(actual - expected).max() / np.abs(expected).max())
  print(f"{what}: max |error| / max |expected| = {error:.2e}")
  assert error <= RTOL, (what, error)


def _images(size, batch=3, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(
      np.float32)


def _features(arch, result, images_nchw):
  model = models.create_backbone(arch)
  variables = {"params": result["backbone"]["params"]}
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x))(
      variables, jnp.asarray(images_nchw.transpose(0, 2, 3, 1))))


def _expected(model, images_nchw):
  with torch.no_grad():
    return model.features(torch.from_numpy(images_nchw)).numpy()


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _timm(seed, **kwargs):
  torch.manual_seed(seed)
  return vit_models.TimmViT(**TORCH, mlp_dim=64, grid=4, **kwargs).eval()


# ------------------------------------------------------------------------ timm layouts
@pytest.mark.parametrize("source", ["timm_pth", "timm_safetensors", "deit", "dino", "mae"])
def test_timm_named_checkpoints(tmp_path, source):
  """timm's `.pth` and `.safetensors` (with its ImageNet-style head: the source head),
  DeiT's `{"model": ...}`, DINO's backbone-only file and MAE's pre-training checkpoint
  (decoder dropped and reported). Features within 1e-4 of PyTorch's at the checkpoint's
  grid and, for timm, at another input size (the position grid resized bicubically)."""
  if source == "mae":
    model = vit_models.MaeViT(**TORCH, mlp_dim=64, grid=4).eval()
  else:
    model = _timm(1, num_classes=0 if source == "dino" else 10)
  state = _state_dict(model)
  path = tmp_path / "model.pth"
  if source == "timm_safetensors":
    path = fakes.write_safetensors(tmp_path / "model.safetensors", state)
  elif source in ("deit", "mae"):
    torch.save({"model": model.state_dict(), "epoch": 299}, path,
               _use_new_zipfile_serialization=source == "mae")
  else:
    torch.save(model.state_dict(), path)
  result = convert.convert_checkpoint(path, arch="tiny_timm")
  report = result["report"]
  assert report["kind"] == ("mae" if source == "mae" else "timm")
  assert report["backbone_parameters"] == sum(
      p.numel() for n, p in model.named_parameters()
      if not n.startswith(("head.", "decoder_", "mask_token")))
  assert result["backbone"]["batch_stats"] == {}
  for size in (16, 24) if source.startswith("timm") else (16,):
    images = _images(size)
    _close(_features("tiny_timm", result, images), _expected(model, images),
           f"{source} features at {size} px")
  if source == "mae":
    assert any("MAE decoder" in d for d in report["dropped"]), report["dropped"]
    assert "source_head" not in result
  elif source == "dino":
    assert "source_head" not in result and any("headless" in n for n in report["notes"])
  else:
    images = _images(16, seed=3)
    logits = _features("tiny_timm", result, images) @ result["source_head"]["kernel"] + (
        result["source_head"]["bias"])
    with torch.no_grad():
      _close(logits, model(torch.from_numpy(images)).numpy(), f"{source} logits")
  if source == "deit":
    assert report["dropped"] == ["epoch (checkpoint metadata)"]


# ------------------------------------------------------------------------------- CLIP
def _clip(seed):
  torch.manual_seed(seed)
  model = vit_models.Clip(**TORCH, grid=4, out_dim=16).eval()
  return vit_models.to_half_as_openai(model)


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript"])
def test_openai_clip(tmp_path, fmt):
  """OpenAI CLIP's full model as released: its visual tower kept, the text tower dropped
  and reported, float16 and float32 tensors mixed (float16 read as float32), attention
  as `nn.MultiheadAttention`'s `in_proj_weight` (rows q, k, v). The TorchScript archive
  (`torch.jit.save`, as OpenAI's `ViT-B-16.pt`) is read without running its code."""
  model = _clip(2)
  half = {k for k, v in model.state_dict().items() if v.dtype == torch.float16}
  assert "visual.proj" in half and "visual.class_embedding" not in half
  path = tmp_path / "ViT-B-16.pt"
  if fmt == "state_dict":
    torch.save(model.state_dict(), path)
  else:  # traced in float32, then its weights cast back to OpenAI's float16
    scripted = torch.jit.trace(model.float(), torch.zeros(1, 3, 16, 16))
    with torch.no_grad():
      for name, p in scripted.named_parameters():
        if name in half:
          p.data = p.data.half()
    torch.jit.save(scripted, str(path))
    model = _clip(2)
  result = convert.convert_checkpoint(path, arch="tiny_clip")
  report = result["report"]
  assert report["kind"] == "clip" and report["format"] == (
      "torchscript" if fmt == "torchscript" else "torch_zip")
  assert any("CLIP text tower" in d for d in report["dropped"]), report["dropped"]
  assert any("float16 tensors read as float32" in n for n in report["notes"])
  assert "source_head" not in result
  model = model.float()  # the same float16-rounded weights, computed in float32
  images = _images(16)
  _close(_features("tiny_clip", result, images), _expected(model.visual, images),
         f"CLIP ({fmt}) features")
  assert report["backbone_parameters"] == sum(p.numel() for p in model.visual.parameters())


# ----------------------------------------------------------------------------- DINOv2
@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2(tmp_path, registers):
  """DINOv2 (LayerScale `ls1.gamma` / `ls2.gamma`, `mask_token` dropped, register tokens
  kept): features within 1e-4 at inputs whose patch grid is smaller (5 -> 4) and larger
  (5 -> 7) than the checkpoint's, the grid resized as DINOv2 does (bicubic,
  `scale_factor` (g' + 0.1) / g). The chunked names of DINOv2's FSDP training
  (`blocks.{chunk}.{i}.`) map as the flat ones."""
  torch.manual_seed(3)
  model = vit_models.TimmViT(**TORCH, mlp_dim=64, grid=5, layer_scale=True, dinov2=True,
                             num_registers=registers, offset=0.1).eval()
  with torch.no_grad():  # LayerScale away from its 1e-5 start, as in a trained model
    for name, p in model.named_parameters():
      if name.endswith("gamma"):
        p.copy_(torch.rand_like(p) + 0.5)
  state = _state_dict(model)
  state = {k.replace("blocks.1.", "blocks.0.1.") if registers else k: v
           for k, v in state.items()}
  path = tmp_path / "dinov2.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  arch = "tiny_dinov2_reg4" if registers else "tiny_dinov2"
  result = convert.convert_checkpoint(path, arch=arch)
  assert result["report"]["kind"] == "dinov2"
  assert result["report"]["dropped"] == [
      "mask_token (DINOv2 mask token (masked-image pre-training only))"]
  for size in (16, 28, 20):
    images = _images(size, seed=size)
    _close(_features(arch, result, images), _expected(model, images),
           f"DINOv2 ({registers} registers) at {size} px")
  if registers:
    with pytest.raises(convert.ConversionError, match="4 register tokens: use a `_reg4`"):
      convert.convert_checkpoint(path, arch="tiny_dinov2")


# ------------------------------------------------------------------- bad combinations
def test_wrong_family_or_kind_is_one_clear_error(tmp_path):
  vit_path = tmp_path / "vit.pth"
  torch.save(_timm(4, num_classes=10).state_dict(), vit_path)
  with pytest.raises(convert.ConversionError, match="holds a Vision Transformer, not a "
                     "ResNet/DenseNet as --arch resnet50 needs: choose --arch among .*vit_b16"):
    convert.convert_checkpoint(vit_path, arch="resnet50")
  resnet_path = tmp_path / "resnet.pth"
  torch.save({"conv1.weight": torch.zeros(16, 3, 3, 3)}, resnet_path)
  with pytest.raises(convert.ConversionError, match="holds a convolutional network, not "
                     "a ViT as --arch vit_s16 needs"):
    convert.convert_checkpoint(resnet_path, arch="vit_s16")
  with pytest.raises(convert.ConversionError, match="does not match arch 'vit_s16'.*"
                     "expects \\(1, 1, 384\\).*width is 32"):
    convert.convert_checkpoint(vit_path, arch="vit_s16")
  distilled = dict(_state_dict(_timm(4, num_classes=10)), dist_token=np.zeros((1, 1, 32)))
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in distilled.items()}, vit_path)
  with pytest.raises(convert.ConversionError, match="distilled DeiT"):
    convert.convert_checkpoint(vit_path, arch="tiny_timm")


# ------------------------------------------------------------------- the real sizes
def _meta_state_dict(model_fn):
  """The checkpoint's names and shapes at full size, without the memory: each tensor a
  zero-stride view of one float."""
  with torch.device("meta"):
    model = model_fn()
  one = np.zeros(1, np.float32)
  return {k: np.lib.stride_tricks.as_strided(one, tuple(v.shape), (0,) * v.dim())
          for k, v in model.state_dict().items()}, model


REAL = {
    # arch: (PyTorch model at the release's size, published parameters with the head, M)
    "vit_s16": (lambda: vit_models.TimmViT(patch=16, dim=384, depth=12, heads=6,
                                           mlp_dim=1536, grid=14, num_classes=1000), 22.1),
    "vit_b16": (lambda: vit_models.TimmViT(patch=16, dim=768, depth=12, heads=12,
                                           mlp_dim=3072, grid=14, num_classes=1000), 86.6),
    "vit_l16": (lambda: vit_models.TimmViT(patch=16, dim=1024, depth=24, heads=16,
                                           mlp_dim=4096, grid=14, num_classes=1000), 304.3),
    "clip_vit_b16": (lambda: vit_models.Clip(patch=16, dim=768, depth=12, heads=12,
                                             grid=14, out_dim=512), None),
    "dinov2_vit_s14": (lambda: vit_models.TimmViT(
        patch=14, dim=384, depth=12, heads=6, mlp_dim=1536, grid=37, layer_scale=True,
        dinov2=True), None),
    "dinov2_vit_b14_reg4": (lambda: vit_models.TimmViT(
        patch=14, dim=768, depth=12, heads=12, mlp_dim=3072, grid=37, layer_scale=True,
        dinov2=True, num_registers=4), None),
}


@pytest.mark.parametrize("arch", sorted(REAL))
def test_every_tensor_of_the_real_size_finds_its_place(arch):
  """Each arch against its release's names and shapes (timm's published sizes: ViT-S/16
  22.1M, B/16 86.6M, L/16 304.3M parameters with the 1000-way head); the pooled width
  as the issue lists it."""
  state, model = _meta_state_dict(REAL[arch][0])
  kind, backbone, head, _, _ = vit_mapping.map_vit(arch, state)
  count = sum(int(v.size) for v in jax.tree.leaves(backbone["params"]))
  if REAL[arch][1]:
    with_head = count + head["kernel"].size + head["bias"].size
    assert kind == "timm" and round(with_head / 1e6, 1) == REAL[arch][1], with_head
  visual = model.visual if kind == "clip" else model
  assert count == sum(p.numel() for n, p in visual.named_parameters()
                      if not n.startswith(("head.", "mask_token")))
  assert models.num_features(arch) == {"vit_s16": 384, "vit_b16": 768, "vit_l16": 1024,
                                       "clip_vit_b16": 512, "dinov2_vit_s14": 384,
                                       "dinov2_vit_b14_reg4": 768}[arch]


def test_command_line_on_the_demo_vit(tmp_path, capsys):
  """`bitune-convert SRC DST --arch vit_demo` on a timm-named checkpoint: the report in
  sentences, and the file read back (`load_converted`) as the conversion was, with the
  empty `batch_stats` a ViT has."""
  from bitune_jax.cli import convert as convert_cli  # pylint: disable=g-import-not-at-top
  torch.manual_seed(5)
  model = vit_models.TimmViT(patch=4, dim=64, depth=4, heads=4, mlp_dim=128, grid=8,
                             num_classes=5).eval()
  src, dst = tmp_path / "vit.pth", tmp_path / "vit.npz"
  torch.save(model.state_dict(), src)
  assert convert_cli.main([str(src), str(dst), "--arch", "vit_demo"]) == 0
  out = capsys.readouterr().out
  count = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
  assert f"Backbone: vit_demo from a timm checkpoint, {count:,} parameters." in out, out
  assert "Source head from 'head': 5 classes." in out, out
  loaded = convert.load_converted(dst)
  assert loaded["backbone"]["batch_stats"] == {}
  images = _images(32)
  _close(_features("vit_demo", loaded, images), _expected(model, images), "vit_demo")
