"""`bitune_jax.methods.base`: a method is one record, and adding one is one module and
one config file. A method written here, outside the package (label smoothing), is
found by the package's discovery, configured, validated, trained by the one shared step
and checked against NumPy."""

import importlib.util
import textwrap

import jax
import numpy as np
import pytest

import fakes
from bitune_jax import methods, sharding
from bitune_jax.methods import base, common
from bitune_jax.training import config_base, loop

METHOD_MODULE = '''
"""Label smoothing: cross-entropy against (1 - eps) * one_hot + eps / C."""

import jax
import optax

from bitune_jax.methods import base, common


def loss(params, state, batch, context, *, model, cfg):
  del context
  out, batch_stats = common.forward(model, params, state.batch_stats, batch["image"],
                                    train=True)
  targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], model.num_classes), cfg)
  value = optax.softmax_cross_entropy(out["logits"], targets).mean()
  return value, (batch_stats, {"smoothed_ce": value}, None)


METHOD = base.Method(
    name="label_smoothing", sections=("label_smoothing",),
    rules={"label_smoothing.epsilon": ("in [0, 1)", lambda v: 0 <= v < 1)},
    step_config=lambda config: config.label_smoothing.epsilon, loss=loss)
'''

CONFIG_FILE = '''
import ml_collections

from bitune_jax.training import config_base


def get_config(arg):
  config = config_base.base_config(arg, "label_smoothing")
  config.label_smoothing = ml_collections.ConfigDict({"epsilon": 0.2})
  return config
'''


@pytest.fixture
def new_method(tmp_path, monkeypatch):
  """The method module in a folder of the methods package's path (as if it were
  `bitune_jax/methods/label_smoothing.py`), discovered; and its config module."""
  folder = tmp_path / "methods"
  folder.mkdir()
  (folder / "label_smoothing.py").write_text(textwrap.dedent(METHOD_MODULE))
  monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(folder)])
  monkeypatch.setattr(methods, "METHODS", methods.discover())
  (tmp_path / "config.py").write_text(textwrap.dedent(CONFIG_FILE))
  spec = importlib.util.spec_from_file_location("label_smoothing_config",
                                                tmp_path / "config.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  yield module
  import sys  # pylint: disable=g-import-not-at-top
  sys.modules.pop("bitune_jax.methods.label_smoothing", None)


def _tiny(config):
  config.init_from, config.image_size = "", 16
  config.batch_size, config.eval_batch_size, config.total_steps = 16, 64, 2
  config.log_every = config.eval_every = config.checkpoint_every = 1
  return config


def test_a_new_method_is_one_module_and_one_config(new_method):
  assert isinstance(methods.get("label_smoothing"), base.Method)
  assert "label_smoothing" in config_base.sections()
  config = _tiny(new_method.get_config("demo"))
  mesh = sharding.make_mesh()
  run = loop.setup(config, mesh)
  batch = next(fakes.view_batches(run))
  before = jax.device_get(run.state)
  state, metrics = run.train_step(run.state, sharding.global_batch(batch, mesh))
  metrics = jax.device_get(metrics)
  # NumPy: the smoothed cross-entropy of the step's own forward (train mode).
  out, _ = common.forward(run.model, before.params, before.batch_stats, batch["image"],
                          train=True)
  logits = np.asarray(out["logits"], np.float64)
  log_p = logits - logits.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  targets = np.full(logits.shape, 0.2 / 5) + 0.8 * np.eye(5)[batch["label"]]
  expected = -np.mean(np.sum(targets * log_p, axis=1))
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
  assert float(metrics["smoothed_ce"]) == float(metrics["loss"])
  assert int(state.step) == 1  # the shared step counted it
  # The state moved: the shared step applied the gradient.
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(),
                       jax.device_get(state.params["head"]), before.params["head"])
  assert max(jax.tree.leaves(moved)) > 0


def test_a_new_methods_rules_and_section_are_checked(new_method):
  config = new_method.get_config("demo")
  config.label_smoothing.epsilon = 1.5
  with pytest.raises(ValueError, match=r"label_smoothing.epsilon must be in \[0, 1\)"):
    config_base.validate(config)
  config = new_method.get_config("demo")
  config.bituning = fakes.tiny_config("bituning").bituning
  with pytest.raises(ValueError, match="has the 'bituning' section of bituning"):
    config_base.validate(config)
  del config["label_smoothing"]
  with pytest.raises(ValueError, match="needs its 'label_smoothing' section"):
    config_base.validate(config)


def test_a_method_is_named_after_its_module(tmp_path, monkeypatch):
  folder = tmp_path / "methods"
  folder.mkdir()
  (folder / "smoothing.py").write_text(textwrap.dedent(METHOD_MODULE))
  monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(folder)])
  try:
    with pytest.raises(ImportError, match="declares the method 'label_smoothing'"):
      methods.discover()
  finally:
    import sys  # pylint: disable=g-import-not-at-top
    sys.modules.pop("bitune_jax.methods.smoothing", None)


def test_a_record_says_what_it_cannot_be():
  with pytest.raises(ValueError, match="views must be one of one, two, weak_strong"):
    base.Method(name="x", views="three")
  with pytest.raises(ValueError, match="evaluation must be 'classifier' or 'features'"):
    base.Method(name="x", evaluation="kmeans")
