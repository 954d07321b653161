"""Co-Tuning Table 2: classification accuracy on the medium-scale datasets
(CUB-200-2011, Stanford Cars, FGVC Aircraft) at sampling rates 15/30/50/100%, from a
pre-trained ResNet-50, transcribed from the Co-Tuning slides (NeurIPS 2020,
which reprint the paper's Table 2 with its numbering).

Setting: the slides say only "Table 2: Classification accuracy in medium-scale
classification datasets (Pre-trained ResNet-50)." and "Sampling Rates 15% 30% 50%
100%" (the percentage of the labelled training data used). The checkpoint is the
ImageNet supervised ResNet-50: Co-Tuning transfers the pre-trained 1000-way ImageNet
classifier ("learn the category relationship p(y_s | y_t)" between COCO/target and
ImageNet categories), which only a supervised checkpoint has. Numbers are mean ± std
as printed.

Transcription notes: the slides print "L ² -SP" (a superscript split by the text
extraction); the row is labelled "L2-SP (Li et al., 2018)". Each method appears in
each of the three dataset blocks and is one row here, its numbers covering the 12
columns. DELTA runs with `configs/delta.py`.
"""

from bitune_jax.configs.tables import Column, Row, Table

_RATES = (15, 30, 50, 100)
_DATASETS = (("CUB", "cub"), ("Cars", "cars"), ("Aircraft", "aircraft"))
_COLUMNS = tuple(Column(f"{name} {r}%", dataset, rate=r)
                 for name, dataset in _DATASETS for r in _RATES)


def _row(label, config, cub, cars, aircraft, missing=""):
  numbers = {}
  for (name, _), values in zip(_DATASETS, (cub, cars, aircraft)):
    numbers.update({f"{name} {r}%": v for r, v in zip(_RATES, values, strict=True)})
  return Row(label, config, "resnet50", "supervised_resnet50", numbers,
             missing=missing)


TABLE = Table(
    paper="co-tuning", number=2,
    title="Classification accuracy in medium-scale classification datasets "
          "(pre-trained ResNet-50)",
    metric="top-1 accuracy (%)",
    columns=_COLUMNS,
    rows=(
        _row("Fine-tune (baseline)", "finetune",
             cub=[(45.25, 0.12), (59.68, 0.21), (70.12, 0.29), (78.01, 0.16)],
             cars=[(36.77, 0.12), (60.63, 0.18), (75.10, 0.21), (87.20, 0.19)],
             aircraft=[(39.57, 0.20), (57.46, 0.12), (67.93, 0.28), (81.13, 0.21)]),
        _row("L2-SP (Li et al., 2018)", "l2sp",
             cub=[(45.08, 0.19), (57.78, 0.24), (69.47, 0.29), (78.44, 0.17)],
             cars=[(36.10, 0.30), (60.30, 0.28), (75.48, 0.22), (86.58, 0.26)],
             aircraft=[(39.27, 0.24), (57.12, 0.27), (67.46, 0.26), (80.98, 0.29)]),
        _row("DELTA (Li et al., 2019)", "delta",
             cub=[(46.83, 0.21), (60.37, 0.25), (71.38, 0.20), (78.63, 0.18)],
             cars=[(39.37, 0.34), (63.28, 0.27), (76.53, 0.24), (86.32, 0.20)],
             aircraft=[(42.16, 0.21), (58.60, 0.29), (68.51, 0.25), (80.44, 0.20)]),
        _row("BSS (Chen et al., 2019)", "bss",
             cub=[(47.74, 0.23), (63.38, 0.29), (72.56, 0.17), (78.85, 0.31)],
             cars=[(40.57, 0.12), (64.13, 0.18), (76.78, 0.21), (87.63, 0.27)],
             aircraft=[(40.41, 0.12), (59.23, 0.31), (69.19, 0.13), (81.48, 0.18)]),
        _row("Co-Tuning", "cotuning",
             cub=[(52.58, 0.53), (66.47, 0.17), (74.64, 0.36), (81.24, 0.14)],
             cars=[(46.02, 0.18), (69.09, 0.10), (80.66, 0.25), (89.53, 0.09)],
             aircraft=[(44.09, 0.67), (61.65, 0.32), (72.73, 0.08), (83.87, 0.09)]),
    ))
