"""The command lines: bitune-train, bitune-eval, bitune-export, bitune-sweep
(bitune-convert's is `bitune_jax.convert.cli`), and what they share."""
