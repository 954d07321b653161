"""Center loss: cross-entropy + lambda/2 mean ||h_i - c_{y_i}||^2 (Wen et al. 2016).

The config lives in the package, `bitune_jax/configs/center_loss.py` (in the wheel); this
file lets a source checkout say `--config configs/center_loss.py:ARG`.
"""

from bitune_jax.configs.center_loss import get_config  # noqa: F401
