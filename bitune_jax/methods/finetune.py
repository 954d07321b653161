"""Vanilla fine-tuning: cross-entropy on a new head; the baseline of every comparison.

Every default of `base.Method` is vanilla fine-tuning's (one view, the plain network,
no extras, the cross-entropy loss).
"""

from bitune_jax.methods import base

METHOD = base.Method(name="finetune")
