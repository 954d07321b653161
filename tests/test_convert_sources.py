"""Converter on self-supervised ResNet-50 checkpoints: MoCo v3, SwAV, DeepCluster-v2 and
InsDisc, each a PyTorch model in its project's exact layout (third_party/ssl_models.py)
with random weights and BatchNorm statistics, saved as its project saves it. Checked:
the source detected from the key layout, backbone features and projector outputs
against PyTorch in eval mode (float32 matmuls, within 1e-4), and what is dropped."""

import contextlib
import io
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import ssl_models
import torch
from torch import nn

from bitune_jax import convert, models
from bitune_jax.cli import convert as convert_cli

RTOL = 1e-4


class LinearAverage(nn.Module):
  """InsDisc's memory bank (lemniscate's `lib.LinearAverage`): `torch.save` pickles it
  by reference to this test module, a class the converter never imports."""

  def __init__(self, input_size, output_size, t=0.07, momentum=0.5):
    super().__init__()
    self.nLem = output_size
    self.register_buffer("params", torch.tensor([t, momentum]))
    stdv = 1.0 / math.sqrt(input_size / 3)
    self.register_buffer("memory", torch.rand(output_size, input_size) * 2 * stdv - stdv)


def _rel_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _close(actual, expected, what):
  error = _rel_error(actual, expected)
  print(f"{what}: max |error| / max |expected| = {error:.2e}")
  np.testing.assert_allclose(actual, expected, rtol=RTOL,
                             atol=RTOL * float(np.abs(expected).max()), err_msg=what)


def _images(batch=2, size=64, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(
      np.float32)


def _save(obj, path, fmt):
  torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
  return str(path)


# Per source: the model, the checkpoint as its project saves it, the torch format, and
# what the report must say it dropped.
def _moco_v3(gen):
  model = ssl_models.randomize_(ssl_models.MoCoV3ResNet50(), gen).eval()
  return model, ssl_models.moco_v3_checkpoint(model, gen), "zip", [
      "tensors of the MoCo v3 momentum encoder (e.g. module.momentum_encoder.conv1.weight)",
      "tensors of the MoCo v3 predictor (e.g. module.predictor.0.weight)",
      "optimizer (checkpoint metadata)", "scaler (checkpoint metadata)"]


def _swav(gen):
  model = ssl_models.randomize_(ssl_models.SwAVResNet50(nmb_prototypes=3000), gen).eval()
  return model, ssl_models.swav_state_dict(model), "zip", [
      "module.prototypes.weight (SwAV prototypes)"]


def _deepcluster_v2(gen):
  model = ssl_models.randomize_(ssl_models.SwAVResNet50(nmb_prototypes=[3000] * 3),
                                gen).eval()
  checkpoint = {"epoch": 800, "state_dict": ssl_models.swav_state_dict(model),
                "optimizer": {"state": {}, "param_groups": []}}
  return model, checkpoint, "legacy", [
      "3 tensors of the DeepCluster-v2 prototypes (e.g. module.prototypes.prototypes0.weight)",
      "epoch (checkpoint metadata)"]


def _insdisc(gen):
  model = ssl_models.randomize_(ssl_models.insdisc_resnet50(), gen).eval()
  checkpoint = ssl_models.insdisc_checkpoint(model, LinearAverage(128, 1000))
  return model, checkpoint, "legacy", [  # the 2018 files are in torch's legacy format
      "lemniscate (a pickled test_convert_sources.LinearAverage object, read as data, "
      "never imported or run: params [2], memory [1000, 128])",
      "best_prec1 (checkpoint metadata)"]


SOURCES = {"moco_v3": _moco_v3, "swav": _swav, "deepcluster_v2": _deepcluster_v2,
           "insdisc": _insdisc}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """source -> a dict of the torch model, paths, conversion result and torch outputs;
  built once per source when first asked for (MoCo v3 through the CLI and its file)."""
  cache = {}

  def get(source):
    if source not in cache:
      folder = tmp_path_factory.mktemp(source)
      seed = list(SOURCES).index(source)
      model, checkpoint, fmt, dropped = SOURCES[source](torch.Generator().manual_seed(seed))
      path = _save(checkpoint, folder / f"{source}.pth.tar", fmt)
      del checkpoint
      out = io.StringIO()
      if source == "moco_v3":
        with contextlib.redirect_stdout(out):
          assert convert_cli.main([path, str(folder / "out.npz"), "--arch", "resnet50"]) == 0
        result = convert.load_converted(folder / "out.npz")
      else:
        result = convert.convert_checkpoint(path, arch="resnet50")
      images = _images()
      with torch.no_grad():
        features = model.forward_features(torch.from_numpy(images)).numpy()
        projections = model(torch.from_numpy(images)).numpy()
      cache[source] = dict(model=model, path=path, fmt=fmt, dropped=dropped,
                           result=result, images=images, features=features,
                           projections=projections, stdout=out.getvalue())
    return cache[source]
  return get


def _flax_projection(result, features):
  config = result["report"]["projector_config"]
  variables = {"params": result["projector"]}
  if "projector_batch_stats" in result:
    variables["batch_stats"] = result["projector_batch_stats"]
  with jax.default_matmul_precision("float32"):
    return models.Projector(**config).apply(variables, features)


@pytest.mark.parametrize("source", list(SOURCES))
def test_detected_converted_and_dropped(converted, source):
  c = converted(source)
  result, report = c["result"], c["result"]["report"]
  assert report["kind"] == source and report["format"] == f"torch_{c['fmt']}"
  assert "source_head" not in result
  with jax.default_matmul_precision("float32"):
    features = models.create_backbone("resnet50").apply(
        result["backbone"], jnp.asarray(c["images"].transpose(0, 2, 3, 1)), train=False)
  _close(features, c["features"], f"{source} features")
  _close(_flax_projection(result, features), c["projections"], f"{source} projector")
  for line in c["dropped"]:
    assert any(line in d for d in report["dropped"]), (line, report["dropped"])
  mapped = {"module." + k for k in c["model"].state_dict()
            if k.startswith(("conv1", "bn1", "layer", "fc", "projection_head"))}
  assert not [d for d in report["dropped"] if d.split(" ")[0] in mapped]


def test_projector_configurations(converted):
  """The Projector each source needs, recorded in the report; BatchNorm statistics
  where the source has them (MoCo v3's last BatchNorm1d has no affine parameters)."""
  expected = {
      "moco_v3": dict(dim=256, hidden_dim=4096, use_bias=False, hidden_bn=True, out_bn=True),
      "swav": dict(dim=128, hidden_dim=2048, use_bias=True, hidden_bn=True, out_bn=False),
      "deepcluster_v2": dict(dim=128, hidden_dim=2048, use_bias=True, hidden_bn=True,
                             out_bn=False),
      "insdisc": dict(dim=128, hidden_dim=None, use_bias=True, hidden_bn=False,
                      out_bn=False)}
  for source, config in expected.items():
    result = converted(source)["result"]
    assert result["report"]["projector_config"] == config, source
    assert ("projector_batch_stats" in result) == config["hidden_bn"], source
  moco = converted("moco_v3")
  sd = moco["model"].state_dict()
  np.testing.assert_array_equal(moco["result"]["projector"]["out_bn"]["scale"], np.ones(256))
  np.testing.assert_array_equal(moco["result"]["projector_batch_stats"]["out_bn"]["var"],
                                sd["base_encoder.fc.4.running_var"].numpy())
  assert any("fc.4 is BatchNorm1d(affine=False)" in n
             for n in moco["result"]["report"]["notes"])
  assert ("models.Projector(dim=256, hidden_dim=4096, use_bias=False, hidden_bn=True, "
          "out_bn=True)") in moco["stdout"]
  assert "moco_v3" in moco["stdout"] and "\nDropped " in moco["stdout"]
  # Sentences, each thing once: every line a sentence, the projector said on one line.
  lines = moco["stdout"].strip().splitlines()
  assert all(line[0].isupper() and line.endswith(".") for line in lines), lines
  assert sum("models.Projector(" in line for line in lines) == 1, lines
  assert len(set(lines)) == len(lines)


def test_projector_trains_like_torch():
  """Projector(hidden_bn, out_bn, use_bias=False) in training mode: outputs and updated
  running statistics as MoCo v3's MLP in PyTorch's train mode."""
  torch_mlp = ssl_models._mlp(2, 16, 32, 8)  # pylint: disable=protected-access
  ssl_models.randomize_(torch_mlp, torch.Generator().manual_seed(2)).train()
  x = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
  sd = {k: v.numpy().copy() for k, v in torch_mlp.state_dict().items()}
  with torch.no_grad():
    expected = torch_mlp(torch.from_numpy(x)).numpy()
  params = {"hidden": {"kernel": sd["0.weight"].T},
            "hidden_bn": {"scale": sd["1.weight"], "bias": sd["1.bias"]},
            "out": {"kernel": sd["3.weight"].T},
            "out_bn": {"scale": np.ones(8, np.float32), "bias": np.zeros(8, np.float32)}}
  stats = {"hidden_bn": {"mean": sd["1.running_mean"], "var": sd["1.running_var"]},
           "out_bn": {"mean": sd["4.running_mean"], "var": sd["4.running_var"]}}
  projector = models.Projector(dim=8, hidden_dim=32, use_bias=False, hidden_bn=True,
                               out_bn=True)
  with jax.default_matmul_precision("float32"):
    got, updated = projector.apply({"params": params, "batch_stats": stats}, x,
                                   train=True, mutable=["batch_stats"])
  _close(got, expected, "projector (train mode)")
  for name, index in (("hidden_bn", 1), ("out_bn", 4)):
    for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
      _close(updated["batch_stats"][name][ours],
             torch_mlp.state_dict()[f"{index}.{theirs}"].numpy(), f"{name} {ours}")
  with pytest.raises(ValueError, match="hidden_bn=True needs a hidden layer"):
    models.Projector(dim=8, hidden_bn=True).init(jax.random.PRNGKey(0), x)


def test_moco_v3_on_the_wrong_arch_fails_cleanly(converted, tmp_path, capsys):
  path = converted("moco_v3")["path"]
  dst = tmp_path / "r18.npz"
  assert convert_cli.main([path, str(dst), "--arch", "resnet18"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("bitune-convert: error: MoCo v3 checkpoint does not match arch "
                        "'resnet18': ") and err.count("\n") == 1, err
  assert not os.listdir(tmp_path)


def test_wrong_heads_and_foreign_objects_are_conversion_errors(converted, tmp_path):
  swav = converted("swav")
  sd = {k: v for k, v in swav["model"].state_dict().items()
        if not k.startswith("projection_head.1.")}
  path = _save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "swav.pth", "zip")
  with pytest.raises(convert.ConversionError, match=r"unrecognised SwAV head "
                     r"\['projection_head.0', 'projection_head.3'\]: expected"):
    convert.convert_checkpoint(path, arch="resnet50")
  # A pickled object of an unknown class inside the state_dict, or as the whole file.
  inside = {"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7),
                           "memory": LinearAverage(4, 3)}}
  path = _save(inside, tmp_path / "inside.pth", "zip")
  with pytest.raises(convert.ConversionError, match="state_dict entry 'memory' is a "
                     "pickled test_convert_sources.LinearAverage object, not a tensor"):
    convert.convert_checkpoint(path, arch="resnet50")
  path = _save(LinearAverage(4, 3), tmp_path / "whole.pth", "zip")
  with pytest.raises(convert.ConversionError, match="holds a pickled "
                     "test_convert_sources.LinearAverage object .* save its state_dict"):
    convert.convert_checkpoint(path, arch="resnet50")


def test_cmc_is_refused_with_the_reason(tmp_path):
  """CMC's two-branch L/ab ResNets have no bitune_jax backbone: a clear error."""
  sd = {f"module.{branch}.{name}": torch.zeros(2) for branch in ("l_to_ab", "ab_to_l")
        for name in ("conv1.weight", "fc.weight")}
  path = _save({"model": sd, "epoch": 240}, tmp_path / "cmc.pth", "zip")
  with pytest.raises(convert.ConversionError, match="CMC checkpoint .* is not supported"):
    convert.convert_checkpoint(path, arch="resnet50")
