"""bitune_jax: Bi-tuning, Co-Tuning and unsupervised fine-tuning in JAX/Flax.

The loss functions (`bitune_jax.losses`), key stores (`bitune_jax.queues`), momentum
update (`bitune_jax.ema`) and Co-Tuning relationship (`bitune_jax.relationship`) are
pure array code that other JAX projects import piece by piece.
"""

__version__ = "0.1.0"
