"""L2-SP: cross-entropy + an L2 penalty towards the pre-trained weights (Li et al. 2018).

The config lives in the package, `bitune_jax/configs/l2sp.py` (in the wheel); this
file lets a source checkout say `--config configs/l2sp.py:ARG`.
"""

from bitune_jax.configs.l2sp import get_config  # noqa: F401
