"""Bi-tuning Table 5: the collaborative effect of the loss terms (CUB-200-2011,
ResNet-50 pre-trained by MoCo), transcribed from the Bi-tuning paper.

The extracted text lost the table's check marks; the rows are in the paper's order,
CE / CE+CCE / CE+CCL / CCE+CCL / CE+CCE+CCL (its ablation text and the numbers, which
rise with each term, agree with that order).
"""

from bitune_jax.configs.tables import Column, Row, Table

_RATES = (25, 50, 75, 100)
_COLUMNS = tuple(Column(f"CUB {r}%", "cub", rate=r) for r in _RATES)


def _row(label, weights, numbers):
  ce, cce, ccl = weights
  return Row(label, "bituning", "resnet50", "moco_v1_resnet50",
             dict(zip((c.label for c in _COLUMNS), numbers)),
             overrides={"bituning.ce_weight": ce, "bituning.cce_weight": cce,
                        "bituning.ccl_weight": ccl})


TABLE = Table(
    paper="bi-tuning", number=5,
    title="Collaborative effect in Bi-tuning on CUB-200-2011 using ResNet-50 pre-trained "
          "by MoCo",
    metric="top-1 accuracy (%)",
    columns=_COLUMNS,
    rows=(
        _row("CE", (1.0, 0.0, 0.0),
             [(38.57, 0.13), (58.97, 0.16), (69.55, 0.18), (74.35, 0.18)]),
        _row("CE + CCE", (1.0, 1.0, 0.0),
             [(45.42, 0.11), (64.33, 0.28), (71.56, 0.30), (75.82, 0.21)]),
        _row("CE + CCL", (1.0, 0.0, 1.0),
             [(41.09, 0.23), (60.77, 0.31), (70.30, 0.29), (75.30, 0.20)]),
        _row("CCE + CCL", (0.0, 1.0, 1.0),
             [(47.70, 0.41), (64.77, 0.15), (71.69, 0.11), (76.54, 0.24)]),
        _row("CE + CCE + CCL", (1.0, 1.0, 1.0),
             [(50.54, 0.23), (66.88, 0.13), (74.27, 0.05), (77.12, 0.23)]),
    ))
