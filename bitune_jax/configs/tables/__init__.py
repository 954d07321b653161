"""The papers' tables as specs (`bitune_jax.experiments.tables`), one file per table; shipped in
the wheel, so `bitune-sweep --spec configs/tables/<table>.py` works from anywhere."""
