"""What a method asks of the data and the run's `DataSpec` (bitune_jax.data.spec): each
method's `Needs` (`Method.needs`, through `methods.data_needs`), the spec
made from a config, and its views."""

import os
import sys

import pytest

from bitune_jax import methods
from bitune_jax.data import spec as spec_lib
from bitune_jax.data.views import augment, crop

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
import bituning as bituning_config  # noqa: E402  pylint: disable=g-import-not-at-top
import finetune as finetune_config  # noqa: E402  pylint: disable=g-import-not-at-top
import fixmatch as fixmatch_config  # noqa: E402  pylint: disable=g-import-not-at-top
import unsup_finetune as unsup_config  # noqa: E402  pylint: disable=g-import-not-at-top


def test_each_method_needs_what_its_step_reads():
  fixmatch = fixmatch_config.get_config("demo")
  assert methods.data_needs(fixmatch) == spec_lib.Needs(
      views="weak_strong", unlabelled=fixmatch.fixmatch.mu)
  unsup = unsup_config.get_config("demo")
  unsup.unsup.replay_fraction = 0.25
  assert methods.data_needs(unsup) == spec_lib.Needs(views="two", replay_fraction=0.25)
  assert methods.data_needs(bituning_config.get_config("demo")) == spec_lib.Needs("two")
  assert methods.data_needs(finetune_config.get_config("demo")) == spec_lib.Needs()
  # Two views: the methods with a key encoder's second view (`Method.views`).
  assert {name for name, m in methods.METHODS.items() if m.views == "two"} == {
      "bituning", "gpt_star", "unsup_finetune"}


def test_needs_are_checked():
  with pytest.raises(ValueError, match="views must be one of one, two, weak_strong"):
    spec_lib.Needs(views="three")
  with pytest.raises(ValueError, match="need unlabelled images"):
    spec_lib.Needs(views="weak_strong")


def test_data_spec_of_a_config(tmp_path):
  config = bituning_config.get_config("demo")
  config.data.cache_dir = str(tmp_path)
  config.data.kshot, config.data.val_fraction = 3, 0.2
  spec = spec_lib.data_spec(config, methods.data_needs(config))
  assert (spec.dataset, spec.seed, spec.batch_size, spec.kshot, spec.val_fraction) == (
      "digits", config.seed, config.batch_size, 3, 0.2)
  assert spec.cache_dir == str(tmp_path)
  assert spec.cache_side == crop.eval_resize(config.image_size)
  view = spec.view_spec
  assert (view.kind, view.size, view.two_views) == ("reference", config.image_size, True)
  config.data.views = "moco"
  assert spec_lib.data_spec(config, spec_lib.Needs()).cache_side == augment.moco_side(
      config.image_size)
  config.data.cache_side = 99
  assert spec_lib.data_spec(config, spec_lib.Needs()).cache_side == 99
  config.data.cache_dir = "none"
  assert spec_lib.data_spec(config, spec_lib.Needs()).cache_dir == ""


def test_weak_and_strong_views_whatever_data_views(tmp_path):
  config = fixmatch_config.get_config("demo")
  config.data.cache_dir = str(tmp_path)
  view = spec_lib.data_spec(config, methods.data_needs(config)).view_spec
  assert (view.kind, view.two_views) == ("weak_strong", False)
  config.data.views = "simclr"
  with pytest.raises(ValueError, match="data.views must be one of reference, moco"):
    spec_lib.data_spec(config, methods.data_needs(config))
