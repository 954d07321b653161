"""Bi-tuning Table 4: top-1 accuracy on Stanford Cars (100% of the training data),
ResNet-50 with different unsupervisedly pre-trained representations, fine-tuned by
vanilla fine-tuning and by Bi-tuning; transcribed from the Bi-tuning paper.

The representations, Section 5.2: "Bi-tuning is applied to MoCo (version 2) (He et
al., 2020), SimCLR (Chen et al., 2020), InsDisc (Wu et al., 2018), Deep Cluster (Caron
et al., 2018), CMC (Tian et al., 2019) on Car dataset with 100% training data." The
table lists SimCLR twice, 1x and 2x (the ResNet-50 widths of SimCLR v1). All are taken
as ResNet-50 (the paper names no other backbone for them): `moco_v2_resnet50`,
`simclr_1x_resnet50`, `simclr_2x_resnet50`, `insdisc_resnet50`,
`deepcluster_resnet50`, `cmc_resnet50`.

The paper's two columns, "Fine-tuning (100% data)" and "Bi-tuning (100% data)", are
two methods on one setting: here one column, "Cars 100%", and two rows per
representation ("<representation>: Fine-tuning" / ": Bi-tuning", the paper's order).

Transcription notes: the extracted text garbles the SimCLR labels as "SimCLR(1x (Chen
et al., 2020)" and "SimClR(2x (Chen et al., 2020)" (sic, lower-case l); read as SimCLR
1x and 2x. The paper does not say how long its MoCo v2 was pre-trained; our
`moco_v2_resnet50` is the 800-epoch one. SimCLR 2x runs on the `resnet50x2` arch
(every width doubled). Deep Cluster (Caron et al., 2018) released AlexNet and VGG-16
models, not a ResNet-50; the public ResNet-50 of that family is DeepCluster-v2 (the
SwAV repository's), which `deepcluster_resnet50` stands for here. CMC cannot run: its
two-branch ResNet on the L and ab channels of Lab images has no converter (see the
README's converter section).
"""

from bitune_jax.configs.tables import Column, Row, Table

_COLUMN = Column("Cars 100%", "cars", rate=100)

# (name in our labels, checkpoint, fine-tuning, Bi-tuning), in the paper's order
_REPRESENTATIONS = (
    ("Deep Cluster", "deepcluster_resnet50", (83.90, 0.48), (87.71, 0.34)),
    ("InsDisc", "insdisc_resnet50", (86.59, 0.22), (89.54, 0.25)),
    ("CMC", "cmc_resnet50", (86.71, 0.62), (88.35, 0.44)),
    ("MoCo v2", "moco_v2_resnet50", (90.15, 0.48), (90.79, 0.34)),
    ("SimCLR 1x", "simclr_1x_resnet50", (89.30, 0.18), (90.84, 0.22)),
    ("SimCLR 2x", "simclr_2x_resnet50", (91.22, 0.19), (91.93, 0.19)),
)
_CONVERTED = ("moco_v2_resnet50", "simclr_1x_resnet50", "simclr_2x_resnet50",
              "insdisc_resnet50", "deepcluster_resnet50")
_ARCH = {"simclr_2x_resnet50": "resnet50x2"}  # else resnet50


def _rows():
  for name, checkpoint, finetune, bituning in _REPRESENTATIONS:
    missing = ("" if checkpoint in _CONVERTED else
               f"{name}'s two-branch (L / ab) ResNet has no converter")
    for method, config, number in (("Fine-tuning", "finetune", finetune),
                                   ("Bi-tuning", "bituning", bituning)):
      arch = _ARCH.get(checkpoint, "resnet50")
      yield Row(f"{name}: {method}", config, arch, checkpoint,
                {_COLUMN.label: number}, missing=missing)


TABLE = Table(
    paper="bi-tuning", number=4,
    title="Top-1 accuracy on Car dataset with different unsupervisedly pre-trained "
          "representations",
    metric="top-1 accuracy (%)",
    columns=(_COLUMN,),
    rows=tuple(_rows()))
