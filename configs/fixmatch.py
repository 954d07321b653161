"""FixMatch from a pre-trained or fine-tuned backbone (the unsupervised fine-tuning
paper's Table 5).

The config lives in the package, `bitune_jax/configs/fixmatch.py` (in the wheel); this
file lets a source checkout say `--config configs/fixmatch.py:ARG`.
"""

from bitune_jax.configs.fixmatch import get_config  # noqa: F401
