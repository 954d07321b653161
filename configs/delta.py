"""DELTA: attention-weighted feature-map regularisation towards the pre-trained network.

The config lives in the package, `bitune_jax/configs/delta.py` (in the wheel); this
file lets a source checkout say `--config configs/delta.py:ARG`.
"""

from bitune_jax.configs.delta import get_config  # noqa: F401
