"""Vanilla fine-tuning (cross-entropy on a new head): the baseline.

The config lives in the package, `bitune_jax/configs/finetune.py` (in the wheel); this
file lets a source checkout say `--config configs/finetune.py:ARG`.
"""

from bitune_jax.configs.finetune import get_config  # noqa: F401
