"""The offline digits grid (this project's own, no paper numbers): vanilla
fine-tuning, Bi-tuning and Co-Tuning on digits 5-9 at three sampling rates, each from
the same source model (supervised on digits 0-4, pre-trained once per sweep).

  bitune-sweep --spec configs/tables/digits.py --workdir /tmp/digits-grid --seeds 0,1

Each run is the method's `demo` config (`configs/<method>.py:demo`, 300 steps) at the
column's sampling rate; the 18 runs of two seeds take about 12 minutes on 2 CPU cores.
"""

from bitune_jax.configs.tables import Column, Row, Table

_RATES = (25, 50, 100)
_COLUMNS = tuple(Column(f"digits {r}%", "digits", rate=r) for r in _RATES)

TABLE = Table(
    paper="", number=0,
    title="digits grid",
    metric="test top-1 accuracy (%)",
    columns=_COLUMNS,
    rows=(
        Row("vanilla fine-tuning", "finetune", "resnet_small", "", {}),
        Row("Bi-tuning", "bituning", "resnet_small", "", {}),
        Row("Co-Tuning", "cotuning", "resnet_small", "", {}),
    ),
    notes="The embedded task: scikit-learn's 8x8 digits, upsampled; the test split is "
          "269 images of digits 5-9 (one image is 0.37 points).")
