"""Converter: random torchvision-style checkpoints (our PyTorch reference models in
third_party/) saved in both torch formats, converted, and compared in float32."""

import collections
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import fakes
import torch
import torch_models

from bitune_jax import convert, models
from bitune_jax.cli import convert as convert_cli

RTOL = 1e-4


def _close(actual, expected, rtol=RTOL):
  actual, expected = np.asarray(actual), np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=rtol,
                             atol=rtol * float(np.abs(expected).max()))


def _random_model(arch, seed=0, num_classes=1000):
  model = getattr(torch_models, arch)(num_classes=num_classes)
  torch_models.randomize_(model, torch.Generator().manual_seed(seed))
  return model.eval()


def _save(obj, path, fmt):
  torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
  return str(path)


def _images(batch=2, size=64, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(
      np.float32)


def _flax_features(arch, backbone, images_nchw, **kwargs):
  apply = lambda v, x: models.create_backbone(arch).apply(v, x, train=False, **kwargs)
  if arch.startswith("densenet"):
    # One compiled program: op by op, DenseNet-121's ~900 operations compile one by
    # one (the ResNets' few kinds of ops are compiled once for every test here).
    apply = jax.jit(apply)
  with jax.default_matmul_precision("float32"):
    return apply(backbone, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)))


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
  model = _random_model("resnet50", seed=1)
  path = tmp_path_factory.mktemp("ckpt") / "resnet50.pth"
  return model, _save(model.state_dict(), path, "zip")


@pytest.mark.parametrize("arch, fmt", [("resnet18", "zip"), ("resnet18", "legacy"),
                                       ("densenet121", "legacy"), ("densenet121", "zip")])
def test_supervised_checkpoint_parity(tmp_path, arch, fmt):
  model = _random_model(arch)
  path = _save(model.state_dict(), tmp_path / f"{arch}.pth", fmt)
  result = convert.convert_checkpoint(path, arch=arch)
  assert result["report"]["format"] == f"torch_{fmt}"
  assert result["report"]["kind"] == "supervised" and "projector" not in result
  images = _images()
  with torch.no_grad():
    expected = torch_models.features(model, torch.from_numpy(images)).numpy()
    logits = model(torch.from_numpy(images)).numpy()
  got = _flax_features(arch, result["backbone"], images)
  _close(got, expected)
  head = result["source_head"]
  _close(np.asarray(got) @ head["kernel"] + head["bias"], logits)


def test_resnet50_per_stage_parity(resnet50_file):
  model, path = resnet50_file
  result = convert.convert_checkpoint(path, arch="resnet50")
  images = _images(size=96)
  with torch.no_grad():
    stages = torch_models.stage_outputs(model, torch.from_numpy(images))
    logits = model(torch.from_numpy(images)).numpy()
  features, flax_stages = _flax_features("resnet50", result["backbone"], images,
                                         return_stages=True)
  names = ["stem", "layer1", "layer2", "layer3", "layer4"]
  expected = stages if isinstance(stages, (list, tuple)) else [stages[n] for n in names]
  for name, ref in zip(names, expected):
    _close(flax_stages[name], ref.numpy().transpose(0, 2, 3, 1))
  head = result["source_head"]
  _close(np.asarray(features) @ head["kernel"] + head["bias"], logits)


@pytest.mark.parametrize("arch", ["resnet34", "resnet101", "resnet152"])
def test_every_resnet_depth_maps_completely(tmp_path, arch):
  """All variables filled with the right shapes (deep nets share the forward code
  checked above; their mapping is what differs)."""
  model = _random_model(arch)
  path = _save(model.state_dict(), tmp_path / "m.pth", "zip")
  result = convert.convert_checkpoint(path, arch=arch)
  sd = model.state_dict()
  np.testing.assert_array_equal(result["backbone"]["params"]["layer3_1"]["conv2"]["kernel"],
                                sd["layer3.1.conv2.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(result["backbone"]["batch_stats"]["layer4_0"][
      "downsample_bn"]["var"], sd["layer4.0.downsample.1.running_var"].numpy())
  expected = sum(v.numel() for k, v in sd.items() if not k.startswith("fc.")
                 and "running" not in k and "num_batches" not in k)
  assert result["report"]["backbone_parameters"] == expected


@pytest.mark.parametrize("version, fmt", [("v2", "legacy"), ("v1", "zip")])
def test_moco_checkpoint(tmp_path, version, fmt):
  encoder = torch_models.moco_encoder("resnet50", mlp=(version == "v2"))
  torch_models.randomize_(encoder, torch.Generator().manual_seed(3))
  encoder.eval()
  build = getattr(torch_models, f"moco_{version}_state_dict")
  checkpoint = build(encoder, with_module_prefix=(version == "v2"))
  path = _save(checkpoint, tmp_path / "moco.pth.tar", fmt)
  result = convert.convert_checkpoint(path, arch="resnet50")
  report = result["report"]
  assert report["kind"] == f"moco_{version}" and "source_head" not in result
  assert any("encoder_k" in d for d in report["dropped"])
  images = _images()
  with torch.no_grad():
    projections = encoder(torch.from_numpy(images)).numpy()
  features = _flax_features("resnet50", result["backbone"], images)
  projector = models.Projector(dim=128, hidden_dim=2048 if version == "v2" else None)
  with jax.default_matmul_precision("float32"):
    got = projector.apply({"params": result["projector"]}, features)
  _close(got, projections)


def test_cli_round_trip(tmp_path, resnet50_file, capsys):
  model, path = resnet50_file
  dst = tmp_path / "out" / "r50.npz"
  dst.parent.mkdir()
  assert convert_cli.main([path, str(dst), "--arch", "resnet50"]) == 0
  out = capsys.readouterr().out
  assert "resnet50" in out and "1000 classes" in out
  loaded = convert.load_converted(dst)
  direct = convert.convert_checkpoint(path, arch="resnet50")
  for a, b in zip(jax.tree.leaves(loaded["backbone"]), jax.tree.leaves(direct["backbone"])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(loaded["source_head"]["kernel"],
                                direct["source_head"]["kernel"])
  assert loaded["report"]["source_sha256"] == convert.sha256_of(path)
  assert loaded["report"]["arch"] == "resnet50"
  assert [p.name for p in dst.parent.iterdir()] == ["r50.npz"]  # no temp file left


def test_module_entry_point(tmp_path, resnet50_file):
  _, path = resnet50_file
  run = subprocess.run([sys.executable, "-m", "bitune_jax.cli.convert", path,
                        str(tmp_path / "x.npz"), "--arch", "resnet18"],
                       capture_output=True, text=True, check=False)
  assert run.returncode == 2
  assert "does not match arch 'resnet18'" in run.stderr
  assert not os.listdir(tmp_path)  # nothing written


def test_bad_inputs_fail_cleanly(tmp_path, resnet50_file, capsys):
  model, path = resnet50_file
  sd = collections.OrderedDict((k, v.clone()) for k, v in model.state_dict().items())
  cases = {}
  missing = collections.OrderedDict(sd)
  del missing["layer2.1.bn2.running_var"]
  cases["missing"] = (_save(missing, tmp_path / "missing.pth", "zip"), "resnet50",
                      "layer2_1/bn2/var")
  extra = collections.OrderedDict(sd)
  extra["layer5.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
  cases["unexpected"] = (_save(extra, tmp_path / "extra.pth", "zip"), "resnet50",
                         "layer5.0.conv1.weight")
  cases["wrong arch"] = (path, "resnet101", "does not match arch 'resnet101'")
  data = open(path, "rb").read()
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(data[:len(data) // 2])
  cases["truncated"] = (str(truncated), "resnet50", "truncated.pth")
  cases["missing file"] = (str(tmp_path / "nope.pth"), "resnet50", "nope.pth")
  for name, (src, arch, needle) in cases.items():
    dst = tmp_path / f"{name.replace(' ', '_')}.npz"
    assert convert_cli.main([src, str(dst), "--arch", arch]) == 2, name
    err = capsys.readouterr().err
    assert needle in err, (name, err)
    assert not dst.exists(), name
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".bitune-convert")]
  # The extra tensor is tolerated (and reported) when asked for.
  result = convert.convert_checkpoint(cases["unexpected"][0], arch="resnet50",
                                      allow_unused=True)
  assert any("layer5.0.conv1.weight" in n for n in result["report"]["notes"])


def test_malicious_checkpoint_refused_by_cli(tmp_path, capsys):
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))
  src = tmp_path / "evil.pth"
  torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Evil()}, src)
  dst = tmp_path / "out.npz"
  assert convert_cli.main([str(src), str(dst), "--arch", "resnet18"]) == 2
  err = capsys.readouterr().err
  assert "system" in err and not marker.exists() and not dst.exists()


def test_npz_and_old_densenet_names(tmp_path):
  """A plain `.npz` state_dict, with the old torchvision DenseNet names (`norm.1`)."""
  model = _random_model("densenet121", seed=5)
  arrays = {}
  for name, value in model.state_dict().items():
    old = name.replace("norm1.", "norm.1.").replace("conv2.", "conv.2.") if (
        "denselayer" in name) else name
    arrays[old] = value.numpy()
  assert any("norm.1." in k for k in arrays)
  np.savez(tmp_path / "d.npz", **arrays)
  result = convert.convert_checkpoint(tmp_path / "d.npz", arch="densenet121")
  assert result["report"]["format"] == "npz"
  images = _images()
  with torch.no_grad():
    expected = torch_models.features(model, torch.from_numpy(images)).numpy()
  _close(_flax_features("densenet121", result["backbone"], images), expected)


def test_bf16_backbone_runs_with_float32_params(resnet50_file):
  _, path = resnet50_file
  backbone = convert.convert_checkpoint(path, arch="resnet50")["backbone"]
  images = _images(size=64)
  full = _flax_features("resnet50", backbone, images)
  with jax.default_matmul_precision("float32"):
    low = models.create_backbone("resnet50", dtype=jnp.bfloat16).apply(
        backbone, jnp.asarray(images.transpose(0, 2, 3, 1)), train=False)
  assert low.dtype == jnp.float32
  rel = float(jnp.linalg.norm(low - full) / jnp.linalg.norm(full))
  assert rel < 0.05, rel


def test_unknown_arch():
  with pytest.raises(ValueError, match="unknown arch 'resnet51'"):
    models.create_backbone("resnet51")
  with pytest.raises(convert.ConversionError, match="unknown arch"):
    convert.convert_checkpoint("whatever.pth", arch="vgg16")


def test_console_script_is_installed():
  exe = shutil.which("bitune-convert")
  assert exe, "bitune-convert not on PATH: is the package installed (pip install -e .)?"
  run = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
  assert "--arch" in run.stdout and "resnet50" in run.stdout


def test_never_writes_over_the_source_or_an_existing_file(tmp_path, resnet50_file,
                                                          capsys):
  """`bitune-convert X.pth X.pth` once replaced the checkpoint with the npz, exit 0."""
  _, path = resnet50_file
  src = tmp_path / "model.pth"
  shutil.copy(path, src)
  original = src.read_bytes()
  for dst in (src, tmp_path / "." / "model.pth"):
    for flags in ([], ["--overwrite"]):
      assert convert_cli.main([str(src), str(dst), "--arch", "resnet50", *flags]) == 2
      assert capsys.readouterr().err == (
          f"bitune-convert: error: {dst} is the source checkpoint: refusing to write "
          "over it\n")
  link = tmp_path / "link.pth"
  os.symlink(src, link)
  assert convert_cli.main([str(src), str(link), "--arch", "resnet50", "--overwrite"]) == 2
  assert "is the source checkpoint" in capsys.readouterr().err
  assert src.read_bytes() == original
  # An existing destination is kept unless --overwrite is given.
  dst = tmp_path / "out.npz"
  dst.write_bytes(b"earlier result")
  assert convert_cli.main([str(src), str(dst), "--arch", "resnet50"]) == 2
  assert capsys.readouterr().err == (
      f"bitune-convert: error: {dst} exists; pass --overwrite to replace it\n")
  assert dst.read_bytes() == b"earlier result"
  assert convert_cli.main([str(src), str(dst), "--arch", "resnet50", "--overwrite"]) == 0
  assert convert.load_converted(dst)["report"]["source_sha256"] == convert.sha256_of(src)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["link.pth", "model.pth", "out.npz"]


def test_load_converted_names_what_is_wrong_with_a_file(tmp_path):
  """A missing, truncated or foreign `init_from` is one clear ValueError (never numpy's
  advice to load with allow_pickle)."""
  np.savez(tmp_path / "plain.npz", a=np.ones(3))
  np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  (tmp_path / "cut.npz").write_bytes((tmp_path / "plain.npz").read_bytes()[:40])
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  cases = {"missing.npz": "no such file",
           "plain.npz": "is not a bitune-convert output \\(no __meta__ entry\\)",
           "objects.npy": "is not a bitune-convert output \\(not a readable .npz",
           "cut.npz": "is not a bitune-convert output \\(truncated or corrupt .npz\\)",
           "notes.txt": "is not a bitune-convert output \\(not a readable .npz"}
  for name, needle in cases.items():
    with pytest.raises(ValueError, match=f"^{tmp_path / name}:? {needle}") as info:
      convert.load_converted(str(tmp_path / name))
    assert "allow_pickle" not in str(info.value)


# ------------------------------------------------------------ other pre-trained sources
def _numpy_state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_simclr_v1_wide_checkpoint(tmp_path):
  """SimCLR v1 ResNet-50 (2x) as the widely used PyTorch conversion of the official TF
  checkpoints saves it (`{'state_dict': ...}`, torchvision names, every width doubled,
  the stem's too; `fc` its supervised linear head): features and logits within 1e-4."""
  model = _random_model("resnet50x2", seed=5)
  path = _save({"state_dict": model.state_dict()}, tmp_path / "ResNet50_2x.pth", "zip")
  result = convert.convert_checkpoint(path, arch="resnet50x2")
  assert result["report"]["kind"] == "supervised"
  assert result["source_head"]["kernel"].shape == (4096, 1000)
  images = _images(size=32)
  with torch.no_grad():
    expected = model.forward_features(torch.from_numpy(images)).numpy()
    logits = model(torch.from_numpy(images)).numpy()
  features = _flax_features("resnet50x2", result["backbone"], images)
  _close(features, expected)
  head = result["source_head"]
  _close(np.asarray(features) @ head["kernel"] + head["bias"], logits)
  # The 2x file on the 1x arch: a clear error naming the mismatch.
  with pytest.raises(convert.ConversionError, match="shape mismatches"):
    convert.convert_checkpoint(path, arch="resnet50")


def test_simclr_v1_4x_maps_every_tensor_by_shape():
  """ResNet-50 (4x), 375M parameters: too large to write in a test, so its layout is
  checked by shapes: every tensor of the reference model's state_dict (on torch's meta
  device) has its place in `resnet50x4`, and every variable is filled."""
  from bitune_jax.convert import mapping  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):
    model = torch_models.resnet50x4()
  target = mapping.backbone_target("resnet50x4")
  filled = set()
  for name, value in model.state_dict().items():
    module, _, param = name.rpartition(".")
    if module == "fc" or param == "num_batches_tracked":
      continue
    path = mapping.flax_path("resnet50x4", module)
    leaf = {"weight": "scale" if ("params", *path, "scale") in target else "kernel",
            "bias": "bias", "running_mean": "mean", "running_var": "var"}[param]
    key = ("batch_stats" if param.startswith("running") else "params", *path, leaf)
    shape = tuple(value.shape)
    shape = (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape
    assert tuple(target[key].shape) == shape, name
    filled.add(key)
  assert filled == set(target)


@pytest.mark.parametrize("source", ["dino", "barlow_twins", "timm"])
def test_headless_and_timm_resnet50_checkpoints(tmp_path, source):
  """DINO's and Barlow Twins' ResNet-50 files are torchvision state_dicts without `fc`
  (their `fc` is an Identity); timm's `resnet50` `.safetensors` has torchvision's
  names and its 1000-way `fc`. Each converts completely; features within 1e-4."""
  model = _random_model("resnet50", seed=6)
  tensors = _numpy_state_dict(model)
  if source == "timm":  # timm files hold no BatchNorm step counters
    tensors = {k: v for k, v in tensors.items() if "num_batches_tracked" not in k}
    path = fakes.write_safetensors(tmp_path / "model.safetensors",
                                   {k: np.asarray(v, np.float32) for k, v in tensors.items()})
  else:
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    path = _save(tensors, tmp_path / f"{source}_resnet50.pth", "zip")
  result = convert.convert_checkpoint(path, arch="resnet50")
  assert ("source_head" in result) == (source == "timm")
  if source != "timm":
    assert any("headless" in n for n in result["report"]["notes"])
  images = _images()
  with torch.no_grad():
    expected = model.forward_features(torch.from_numpy(images)).numpy()
  _close(_flax_features("resnet50", result["backbone"], images), expected)
