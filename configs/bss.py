"""BSS: cross-entropy + Batch Spectral Shrinkage of the features (Chen et al. 2019).

The config lives in the package, `bitune_jax/configs/bss.py` (in the wheel); this
file lets a source checkout say `--config configs/bss.py:ARG`.
"""

from bitune_jax.configs.bss import get_config  # noqa: F401
