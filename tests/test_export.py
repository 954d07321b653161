"""`bitune-export` and `bitune_jax.inference`: a fine-tuned model written in the
converter's format, loaded back as a jitted classifier with its preprocessing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import outside
from bitune_jax import export, inference, train
from bitune_jax.data import digits
from bitune_jax.data import input as input_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import bituning as bituning_config  # noqa: E402  pylint: disable=g-import-not-at-top
import finetune as finetune_config  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = finetune_config.get_config("demo")
  config.init_from, config.image_size, config.batch_size = "", 16, 16
  config.total_steps, config.eval_every, config.checkpoint_every = 6, 3, 3
  state, summary = train.train_and_evaluate(config, str(workdir))
  return config, workdir, state, summary


def test_exported_model_classifies_the_test_set_as_the_run_did(trained, tmp_path):
  config, workdir, state, summary = trained
  out = tmp_path / "model.npz"
  report = export.export_workdir(str(workdir), str(out))
  assert report["step"] == 6 and report["preprocessing"] == {"kind": "digits",
                                                             "image_size": 16}
  model = inference.load(str(out))
  data = input_lib.load(config, two_views=False)
  got = model(data.test.images)
  assert got["logits"].shape == (269, 5) and got["features"].shape[0] == 269
  top1, mean_class = outside.top1_and_mean_class(got["logits"], data.test.labels)
  assert top1 == pytest.approx(summary["top1"], abs=1.01 / 269)
  assert mean_class == pytest.approx(summary["mean_class_acc"], abs=0.01)
  # The same logits as the trained state's own eval-mode outputs.
  own = outside.eval_outputs(train_model(config), state.params, state.batch_stats,
                             data.test.images[:32])
  np.testing.assert_allclose(got["logits"][:32], own["logits"], rtol=1e-4, atol=1e-4)


def train_model(config):
  from bitune_jax import methods  # pylint: disable=g-import-not-at-top
  return methods.get(config.method).build_model(config, config.num_classes)


def test_image_files_are_preprocessed_as_in_training(trained, tmp_path):
  config, workdir, _, _ = trained
  out = tmp_path / "model.npz"
  export.export_workdir(str(workdir), str(out), which="best")
  model = inference.load(str(out))
  raw = digits._raw_digits()[0][:6]  # pylint: disable=protected-access  [6, 8, 8] in [0, 1]
  files = []
  for i, image in enumerate(raw):
    path = tmp_path / f"digit{i}.png"
    Image.fromarray(np.round(image * 255).astype(np.uint8)).resize((64, 64),
                                                                   Image.NEAREST).save(path)
    files.append(str(path))
  mean, std = digits.digits_mean_std()
  expected = digits._prepare(raw, 16, mean, std)  # pylint: disable=protected-access
  got = model.preprocess(files)
  assert got.shape == (6, 16, 16, 3)
  np.testing.assert_allclose(got, expected, atol=0.02 / std)  # 8-bit PNG rounding
  np.testing.assert_array_equal(model(got)["logits"].argmax(-1),
                                model(expected)["logits"].argmax(-1))


def test_init_from_an_exported_model(trained, tmp_path):
  """Another method starts from the fine-tuned backbone, as from a converted one."""
  from bitune_jax import sharding  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  _, workdir, state, _ = trained
  out = tmp_path / "model.npz"
  export.export_workdir(str(workdir), str(out))
  config = bituning_config.get_config("demo")
  config.init_from, config.image_size, config.batch_size = str(out), 16, 16
  run = train.setup(config, sharding.make_mesh())
  for a, b in zip(jax.tree.leaves(jax.device_get(run.state.params["backbone"])),
                  jax.tree.leaves(jax.device_get(state.params["backbone"]))):
    np.testing.assert_array_equal(a, b)


def test_command_line_refuses_to_overwrite(trained, tmp_path):
  _, workdir, _, _ = trained
  out = tmp_path / "model.npz"
  out.write_bytes(b"an earlier model")
  run = subprocess.run([sys.executable, "-m", "bitune_jax.export", str(out),
                        "--workdir", str(workdir)], capture_output=True, text=True)
  assert run.returncode == 2
  assert run.stderr == f"bitune-export: error: {out} exists; pass --overwrite to replace it\n"
  assert out.read_bytes() == b"an earlier model"
  run = subprocess.run([sys.executable, "-m", "bitune_jax.export", str(out),
                        "--workdir", str(workdir), "--overwrite"],
                       capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  assert json.loads(run.stdout.splitlines()[-1])["step"] == 6
  assert inference.load(str(out)).report["checkpoint"] == "final"


def test_imagenet_preprocessing_is_the_eval_view(rng):
  """For the tfds datasets: resize, centre crop and normalise as the training
  pipeline's eval view (TensorFlow) does, from a decoded image of any size."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from bitune_jax.data import views  # pylint: disable=g-import-not-at-top
  config = finetune_config.get_config("cub,resnet18,25")
  config.image_size = 64
  model = inference.Model(report={"preprocessing": export.preprocessing(config)},
                          apply=None)
  image = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
  got = model.preprocess([image])[0]
  expected = views.eval_view(tf.constant(image), size=64,
                             resize=views.eval_resize(64)).numpy()
  assert got.shape == expected.shape == (64, 64, 3)
  np.testing.assert_allclose(got, expected, atol=2e-3)  # PIL vs TF antialiased bilinear
