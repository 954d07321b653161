"""Unsupervised fine-tuning: MoCo v2 on unlabeled target data + sparse source replay +

The config lives in the package, `bitune_jax/configs/unsup_finetune.py` (in the wheel); this
file lets a source checkout say `--config configs/unsup_finetune.py:ARG`.
"""

from bitune_jax.configs.unsup_finetune import get_config  # noqa: F401
