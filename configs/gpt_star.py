"""GPT*: cross-entropy + MoCo's InfoNCE on a projector (the Bi-tuning paper's baseline).

The config lives in the package, `bitune_jax/configs/gpt_star.py` (in the wheel); this
file lets a source checkout say `--config configs/gpt_star.py:ARG`.
"""

from bitune_jax.configs.gpt_star import get_config  # noqa: F401
