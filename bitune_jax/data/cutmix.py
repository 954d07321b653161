"""`bitune_jax.data.views.cutmix` under its former name, for `methods/unsup_finetune.py`
until it imports the views' module."""

from bitune_jax.data.views.cutmix import box_mask, cutmix, cutmix_boxes  # noqa: F401
