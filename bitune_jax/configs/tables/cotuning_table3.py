"""Co-Tuning Table 3: classification accuracy on the large-scale COCO-70 dataset at
sampling rates 15/30/50/100%, from a pre-trained DenseNet-121, transcribed from
the Co-Tuning slides (NeurIPS 2020, which reprint the paper's
Table 3 with its numbering).

Setting: the slides say only "Table 3: Classification accuracy in large-scale COCO-70
dataset (Pre-trained DenseNet-121)." and "Sampling Rates 15% 30% 50% 100%" (the
percentage of the labelled training data used). The checkpoint is the ImageNet
supervised DenseNet-121 (torchvision): Co-Tuning reuses its 1000-way ImageNet
classifier (the slides' example relates COCO categories to ImageNet ones, "elephant"
to "indian elephant", "african elephant", "tusker"). Numbers are mean ± std as
printed.

Transcription notes: the slides print "L ² -SP" (a superscript split by the text
extraction); the row is labelled "L2-SP (Li et al., 2018)". DELTA runs with
`configs/delta.py`.
"""

from bitune_jax.configs.tables import Column, Row, Table

_RATES = (15, 30, 50, 100)
_COLUMNS = tuple(Column(f"COCO-70 {r}%", "coco70", rate=r) for r in _RATES)


def _row(label, config, numbers, missing=""):
  return Row(label, config, "densenet121", "supervised_densenet121",
             dict(zip((c.label for c in _COLUMNS), numbers, strict=True)),
             missing=missing)


TABLE = Table(
    paper="co-tuning", number=3,
    title="Classification accuracy in large-scale COCO-70 dataset (pre-trained "
          "DenseNet-121)",
    metric="top-1 accuracy (%)",
    columns=_COLUMNS,
    rows=(
        _row("Fine-tune (baseline)", "finetune",
             [(76.60, 0.04), (80.15, 0.25), (82.50, 0.43), (84.41, 0.22)]),
        _row("L2-SP (Li et al., 2018)", "l2sp",
             [(77.53, 0.47), (80.67, 0.29), (83.07, 0.39), (84.78, 0.16)]),
        _row("DELTA (Li et al., 2019)", "delta",
             [(76.94, 0.37), (79.72, 0.24), (82.00, 0.52), (84.66, 0.08)]),
        _row("BSS (Chen et al., 2019)", "bss",
             [(77.39, 0.15), (80.74, 0.22), (82.75, 0.59), (84.71, 0.13)]),
        _row("Co-Tuning", "cotuning",
             [(77.64, 0.23), (81.19, 0.18), (83.43, 0.22), (85.65, 0.11)]),
    ))
