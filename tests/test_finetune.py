"""Vanilla fine-tuning (`bitune_jax/methods/finetune.py`, cross-entropy on a new head):
a real train step on 8 devices against NumPy float64, the cross-entropy and the loss
recomputed from the forward outputs of the whole batch on one device (the harness and
the references are in `method_references.py`)."""

import numpy as np

import fakes
import method_references

RTOL = method_references.RTOL


def test_finetune_step_matches_numpy(monkeypatch):
  config = fakes.tiny_config("finetune")
  mesh, run = method_references.setup(config, monkeypatch)
  batch = next(iter(run.data.train_batches(0)))
  before, _, metrics, _ = method_references.one_step(run, mesh, run.state, batch)
  out, _ = method_references.forward(run.model, before.params, before.batch_stats,
                                     batch["image"])
  ce = method_references.cross_entropy(out["logits"], batch["label"])
  np.testing.assert_allclose(metrics["ce"], ce, rtol=RTOL)
  np.testing.assert_allclose(metrics["loss"], ce, rtol=RTOL)
