"""Bi-tuning (CE + CCE + CCL with per-class key queues and a momentum key encoder).

The config lives in the package, `bitune_jax/configs/bituning.py` (in the wheel); this
file lets a source checkout say `--config configs/bituning.py:ARG`.
"""

from bitune_jax.configs.bituning import get_config  # noqa: F401
