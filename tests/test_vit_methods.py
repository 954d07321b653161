"""Every method on a Vision Transformer: `configs/<method>.py:vit_demo` (the ViT recipe:
AdamW, layer-wise decay, warmup + cosine; a 4-block ViT) at 16 px from a converted
timm-named checkpoint, through the training loop. Checked per method: it trains and
evaluates, drop-path is in its query encoder's forward (and not in a momentum key
encoder's), and a ViT's state has no BatchNorm statistics. DELTA's distance on a ViT's
tokens against NumPy. (The methods' losses are checked against their references on
ResNets, in each method's own test file: the loss only sees features.)"""

import jax
import numpy as np
import pytest
import torch
import vit_models

import fakes
from bitune_jax import convert, methods
from bitune_jax.methods import delta
from bitune_jax.models import vit
from bitune_jax.training import loop


@pytest.fixture(scope="module")
def vit_source(tmp_path_factory):
  """A timm-named ViT in `vit_demo`'s shape with a 10-way head, random weights,
  converted as a user would (`bitune-convert`'s function)."""
  torch.manual_seed(0)
  model = vit_models.TimmViT(patch=4, dim=64, depth=4, heads=4, mlp_dim=128, grid=8,
                             num_classes=10)
  folder = tmp_path_factory.mktemp("vit_source")
  torch.save(model.state_dict(), folder / "vit.pth")
  result = convert.convert_checkpoint(folder / "vit.pth", arch="vit_demo")
  return convert.save_converted(result, str(folder / "vit.npz"))


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_method_trains_a_vit(method, vit_source, tmp_path, monkeypatch):
  config = fakes.tiny_config(method, "vit_demo", init_from=vit_source, total_steps=2,
                             log_every=1, eval_every=2, checkpoint_every=2, drop_path=0.1)
  assert config.optimizer == "adamw" and config.lr_mult.layer_decay < 1
  if method == "delta":
    config.delta.attention_batches, config.delta.attention_batch_size = 1, 8
  if method == "cotuning":  # the converted checkpoint's head
    config.cotuning.source_classes = 10
  calls = []
  real = vit.drop_path
  monkeypatch.setattr(vit, "drop_path", lambda *a: calls.append(1) or real(*a))
  state, summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary["step"] == 2 and np.isfinite(summary["train_loss"]), summary
  assert state.batch_stats == {"backbone": {}}
  # The step traced once: two branches of blocks 1-3 (block 0's rate is 0, the rates
  # rising linearly over the depth as timm's), in the query encoder's one forward
  # (FixMatch's three batches, unsupervised fine-tuning's queries and their CutMix
  # mixes: one forward each); none in a key encoder's or in evaluation.
  assert len(calls) == 2 * 3, (method, len(calls))
  converted = convert.load_converted(vit_source)["backbone"]["params"]
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       jax.device_get(state.params["backbone"]), converted)
  assert min(jax.tree.leaves(moved)) > 0, moved  # every backbone leaf trained


def test_delta_distance_on_tokens_is_numpys(rng):
  """`0.5 * D / T * sum_{b,d} W_d * sum_t (FM - FM*)^2` for `[B, T, D]` tokens."""
  stages = {"blocks_1": rng.standard_normal((3, 17, 8)).astype(np.float32),
            "blocks_3": rng.standard_normal((3, 17, 8)).astype(np.float32)}
  reference = {k: rng.standard_normal(v.shape).astype(np.float32)
               for k, v in stages.items()}
  attention = {k: rng.dirichlet(np.ones(8)).astype(np.float32) for k in stages}
  want = sum(0.5 * 8 / 17 * np.sum(attention[k] * np.sum(
      (stages[k].astype(np.float64) - reference[k]) ** 2, axis=(0, 1))) for k in stages)
  got = delta.feature_map_penalty(stages, reference, attention)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_delta_on_a_vit_takes_the_block_outputs():
  config = fakes.tiny_config("delta", "vit_demo")
  assert config.delta.feature_maps == "stage_output"
  config.delta.feature_maps = "last_conv"
  from bitune_jax.training import config_base  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="its DELTA maps are the block outputs"):
    config_base.validate(config)
