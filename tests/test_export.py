"""`bitune-export` and `bitune_jax.inference`: a fine-tuned model written in the
converter's format, loaded back as a jitted classifier with its preprocessing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fakes
import outside
from bitune_jax import inference, methods
from bitune_jax.data import digits
from bitune_jax.data import input as input_lib
from bitune_jax.training import loop
from bitune_jax.training import export as export_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import bituning as bituning_config  # noqa: E402  pylint: disable=g-import-not-at-top
import finetune as finetune_config  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  # test_cli_eval.py's run: the session's compiled programs serve both files.
  config = fakes.tiny_config("finetune")
  state, summary = loop.train_and_evaluate(config, str(workdir))
  return config, workdir, state, summary


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  """`(path, report, model)`: the run's latest checkpoint exported once for the tests
  that only read it, and loaded back."""
  _, workdir, _, _ = trained
  path = tmp_path_factory.mktemp("exported") / "model.npz"
  report = export_lib.export_workdir(str(workdir), str(path))
  return path, report, inference.load(str(path))


def test_exported_model_classifies_the_test_set_as_the_run_did(trained, exported):
  config, _, state, summary = trained
  _, report, model = exported
  assert report["step"] == 6 and report["preprocessing"] == {"kind": "digits",
                                                             "image_size": 16}
  data = input_lib.load(config, methods.data_needs(config))
  got = model(outside.eval_images(data.test))
  assert got["logits"].shape == (269, 5) and got["features"].shape[0] == 269
  top1, mean_class = outside.top1_and_mean_class(got["logits"], data.test.labels)
  assert top1 == pytest.approx(summary["top1"], abs=1.01 / 269)
  assert mean_class == pytest.approx(summary["mean_class_acc"], abs=0.01)
  # The same logits as the trained state's own eval-mode outputs.
  own = outside.eval_outputs(train_model(config), state.params, state.batch_stats,
                             outside.eval_images(data.test)[:32])
  np.testing.assert_allclose(got["logits"][:32], own["logits"], rtol=1e-4, atol=1e-4)


def train_model(config):
  from bitune_jax import methods  # pylint: disable=g-import-not-at-top
  return methods.get(config.method).build_model(config, config.num_classes)


def test_image_files_are_preprocessed_as_in_training(trained, tmp_path):
  config, workdir, _, _ = trained
  out = tmp_path / "model.npz"
  export_lib.export_workdir(str(workdir), str(out), which="best")
  model = inference.load(str(out))
  raw = digits.raw_uint8()[:6]  # [6, 8, 8] uint8
  files = []
  for i, image in enumerate(raw):
    path = tmp_path / f"digit{i}.png"
    Image.fromarray(image).resize((64, 64), Image.NEAREST).save(path)
    files.append(str(path))
  # The run's evaluation view, by hand: PIL's bilinear resize of the grey digit to
  # S = round(16 * 256 / 224) = 18, its centre 16 x 16, ImageNet normalisation.
  side = 18
  resized = np.stack([np.asarray(Image.fromarray(x).convert("RGB").resize(
      (side, side), Image.BILINEAR)) for x in raw])
  crop = resized[:, 1:17, 1:17].astype(np.float64) / 255
  expected = ((crop - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32)
  got = model.preprocess(files)
  assert got.shape == (6, 16, 16, 3)
  np.testing.assert_allclose(got, expected, atol=1e-5)  # area averaging of a x8 upscale
  np.testing.assert_array_equal(model(got)["logits"].argmax(-1),
                                model(expected)["logits"].argmax(-1))


def test_init_from_an_exported_model(trained, exported):
  """Another method starts from the fine-tuned backbone, as from a converted one."""
  from bitune_jax import sharding  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  _, _, state, _ = trained
  out, _, _ = exported
  config = bituning_config.get_config("demo")
  config.init_from, config.image_size, config.batch_size = str(out), 16, 16
  run = loop.setup(config, sharding.make_mesh())
  for a, b in zip(jax.tree.leaves(jax.device_get(run.state.params["backbone"])),
                  jax.tree.leaves(jax.device_get(state.params["backbone"]))):
    np.testing.assert_array_equal(a, b)


def test_command_line_refuses_to_overwrite(trained, tmp_path):
  _, workdir, _, _ = trained
  out = tmp_path / "model.npz"
  out.write_bytes(b"an earlier model")
  run = subprocess.run([sys.executable, "-m", "bitune_jax.cli.export", str(out),
                        "--workdir", str(workdir)], capture_output=True, text=True)
  assert run.returncode == 2
  assert run.stderr == f"bitune-export: error: {out} exists; pass --overwrite to replace it\n"
  assert out.read_bytes() == b"an earlier model"
  run = subprocess.run([sys.executable, "-m", "bitune_jax.cli.export", str(out),
                        "--workdir", str(workdir), "--overwrite"],
                       capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  assert json.loads(run.stdout.splitlines()[-1])["step"] == 6
  assert inference.load(str(out)).report["checkpoint"] == "latest"


def test_imagenet_preprocessing_is_the_eval_view(rng):
  """For the tfds datasets: the cache's resize to S x S (PIL bilinear, uint8), centre
  crop and normalisation, from a decoded image of any size."""
  config = finetune_config.get_config("cub,resnet18,25")
  config.image_size = 64
  model = inference.Model(report={"preprocessing": export_lib.preprocessing(config)},
                          apply=None)
  image = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
  got = model.preprocess([image])[0]
  side = 73  # round(64 * 256 / 224)
  resized = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
  crop = resized[4:68, 4:68].astype(np.float64) / 255
  expected = (crop - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  assert got.shape == expected.shape == (64, 64, 3)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def _digit_pictures(count):
  """Target test digits as a user has them: RGB uint8 pictures, 32 x 32."""
  rows = digits.transfer_indices("target")["test_rows"][:count]
  return np.stack([np.asarray(Image.fromarray(x).convert("RGB").resize(
      (32, 32), Image.NEAREST)) for x in digits.raw_uint8()[rows]])


def test_float_images_are_classified_as_their_uint8_originals(exported):
  """`plt.imread` of a PNG, or a PIL image through numpy / 255: float32 in [0, 1]."""
  _, _, model = exported
  pictures = _digit_pictures(20)
  floats = [(x / 255.0).astype(np.float32) for x in pictures]
  want = model.preprocess(list(pictures))
  np.testing.assert_array_equal(model.preprocess(floats), want)
  np.testing.assert_array_equal(model(model.preprocess(floats))["logits"].argmax(-1),
                                model(want)["logits"].argmax(-1))
  # One image alone, or the whole batch as one array: the same as in a list.
  np.testing.assert_array_equal(model.preprocess(floats[3]), want[3:4])
  np.testing.assert_array_equal(model.preprocess(pictures), want)
  # A float image in [0, 255] is refused, saying what is accepted.
  with pytest.raises(ValueError, match=r"uint8 in \[0, 255\] or float in \[0, 1\]"):
    model.preprocess([pictures[0].astype(np.float32)])


def test_a_single_path_is_one_image(exported, tmp_path):
  _, _, model = exported
  path = tmp_path / "digit.png"
  Image.fromarray(_digit_pictures(1)[0]).save(path)
  want = model.preprocess([str(path)])
  assert want.shape == (1, 16, 16, 3)
  np.testing.assert_array_equal(model.preprocess(str(path)), want)
  np.testing.assert_array_equal(model.preprocess(path), want)  # os.PathLike


def test_class_names_round_trip_through_export(exported):
  """The digits demo fine-tunes on digits 5-9: its classes are "5".."9", in the
  exported file and as loaded (the t-SNE legend of `bitune-eval --tsne` names them
  too: test_cli_eval.py::test_evaluates_a_workdir_checkpoint)."""
  _, report, model = exported
  assert report["class_names"] == ["5", "6", "7", "8", "9"]
  assert model.class_names == ["5", "6", "7", "8", "9"]
