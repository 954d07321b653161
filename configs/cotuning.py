"""Co-Tuning: the pre-trained classifier keeps training on R[y_t] = p(y_s | y_t).

The config lives in the package, `bitune_jax/configs/cotuning.py` (in the wheel); this
file lets a source checkout say `--config configs/cotuning.py:ARG`.
"""

from bitune_jax.configs.cotuning import get_config  # noqa: F401
