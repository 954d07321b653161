"""Bi-tuning Table 1: top-1 accuracy on CUB-200-2011, Stanford Cars and FGVC Aircraft
at 25/50/75/100% sampling rates, ResNet-50 by supervised pre-training (ImageNet),
transcribed from the Bi-tuning paper.

The caption names the representation: "Top-1 accuracy on various datasets using
ResNet-50 by supervised pre-training." (Section 5.1: "Results are averaged over 5
trials."). Each method appears once per dataset block in the paper; here it is one row
whose numbers cover the columns of all three datasets. DELTA runs with
`configs/delta.py`.
"""

from bitune_jax.configs.tables import Column, Row, Table

_RATES = (25, 50, 75, 100)
_DATASETS = (("CUB", "cub"), ("Cars", "cars"), ("Aircraft", "aircraft"))
_COLUMNS = tuple(Column(f"{name} {r}%", dataset, rate=r)
                 for name, dataset in _DATASETS for r in _RATES)


def _row(label, config, cub, cars, aircraft, missing=""):
  numbers = dict(zip((c.label for c in _COLUMNS), cub + cars + aircraft))
  return Row(label, config, "resnet50", "supervised_resnet50", numbers,
             missing=missing)


TABLE = Table(
    paper="bi-tuning", number=1,
    title="Top-1 accuracy on various datasets using ResNet-50 by supervised "
          "pre-training",
    metric="top-1 accuracy (%)",
    columns=_COLUMNS,
    rows=(
        _row("Fine-tuning (baseline)", "finetune",
             [(61.36, 0.11), (73.61, 0.23), (78.49, 0.18), (80.74, 0.15)],
             [(56.45, 0.21), (75.24, 0.17), (83.22, 0.17), (86.22, 0.12)],
             [(51.25, 0.18), (67.12, 0.41), (75.22, 0.09), (79.18, 0.20)]),
        _row("L2SP (Li et al., 2018)", "l2sp",
             [(61.21, 0.19), (72.99, 0.13), (78.11, 0.17), (80.92, 0.22)],
             [(56.29, 0.21), (75.62, 0.32), (83.60, 0.13), (85.85, 0.12)],
             [(51.07, 0.45), (67.46, 0.22), (75.06, 0.45), (79.07, 0.21)]),
        _row("DELTA (Li et al., 2019)", "delta",
             [(62.89, 0.11), (74.35, 0.28), (79.18, 0.24), (81.33, 0.24)],
             [(58.74, 0.23), (76.53, 0.08), (84.53, 0.29), (86.01, 0.37)],
             [(53.71, 0.30), (68.51, 0.24), (76.51, 0.55), (80.34, 0.14)]),
        _row("BSS (Chen et al., 2019)", "bss",
             [(64.69, 0.31), (74.96, 0.21), (78.91, 0.15), (81.52, 0.11)],
             [(59.74, 0.14), (76.78, 0.16), (85.06, 0.13), (87.64, 0.21)],
             [(53.38, 0.22), (69.19, 0.18), (76.39, 0.22), (80.83, 0.32)]),
        _row("Bi-tuning", "bituning",
             [(67.47, 0.08), (77.17, 0.13), (81.07, 0.09), (82.93, 0.23)],
             [(66.15, 0.20), (81.10, 0.07), (86.07, 0.23), (88.47, 0.11)],
             [(58.27, 0.26), (72.40, 0.22), (80.77, 0.10), (84.01, 0.33)]),
    ))
