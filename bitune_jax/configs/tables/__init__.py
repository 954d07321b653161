"""The papers' tables as specs, one file per table, each defining `TABLE = Table(...)`
in this vocabulary (`bitune_jax.experiments.tables` loads, checks and lists their
cells); shipped in the wheel, so `bitune-sweep --spec configs/tables/<table>.py` works
from anywhere."""

import dataclasses
from collections.abc import Mapping
from typing import Any

# The papers a table comes from; "" for a grid of this project's own (no paper numbers:
# every (row, column) is a cell), e.g. the offline digits grid.
PAPERS = ("bi-tuning", "co-tuning", "unsupervised-finetuning", "")
EVALS = ("", "kshot", "retrieval", "bcubed", "linear_probe")
# The pre-trained representations the tables start from (names, not files).
CHECKPOINTS = {
    "supervised_resnet50": "ImageNet supervised ResNet-50 (torchvision)",
    "supervised_resnet101": "ImageNet supervised ResNet-101 (torchvision)",
    "supervised_densenet121": "ImageNet supervised DenseNet-121 (torchvision)",
    "moco_v1_resnet50": "MoCo v1 ResNet-50, 200 epochs on ImageNet",
    "moco_v2_resnet50": "MoCo v2 ResNet-50, 800 epochs on ImageNet",
    "simclr_1x_resnet50": "SimCLR v1 ResNet-50 (1x)",
    "simclr_2x_resnet50": "SimCLR v1 ResNet-50 (2x)",
    "insdisc_resnet50": "InsDisc ResNet-50",
    "deepcluster_resnet50": "DeepCluster-v2 ResNet-50 (the SwAV repository's)",
    "cmc_resnet50": "CMC ResNet-50",
    "unsupft_resnet50": "per dataset: an unsup_finetune run from moco_v2_resnet50 on "
                        "that dataset, exported by bitune-export",
    "supervised_vit_b16": "ImageNet supervised ViT-B/16 (timm vit_base_patch16_224, "
                          "augreg: ImageNet-21k then 1k, with its 1000-way head)",
    "dino_vit_b16": "DINO ViT-B/16 (backbone only)",
    "clip_vit_b16": "OpenAI CLIP ViT-B/16 (its visual tower)",
    "dinov2_vit_b14": "DINOv2 ViT-B/14 (backbone only)",
    "none": "random initialisation",
}
# A checkpoint described so is given per dataset: `--checkpoint NAME@DATASET=FILE`.
PER_DATASET = "per dataset:"


@dataclasses.dataclass(frozen=True)
class Column:
  label: str  # as in the paper, e.g. "CUB 25%"
  dataset: str  # our dataset name (`config_base.DATASETS`)
  rate: float = 100.0  # sampling rate of the labelled training data, %
  kshot: int = 0  # k labelled images per class (0: use `rate`)
  eval: str = ""  # the protocol the number comes from (`EVALS`)


@dataclasses.dataclass(frozen=True)
class Row:
  label: str  # as in the paper, e.g. "Bi-tuning", "L2SP (Li et al., 2018)"
  # configs/<config>.py (a method), e.g. "bituning"; "" for the pre-trained
  # checkpoint evaluated as it is (no training run; e.g. the k-shot transfer of
  # "Unsup-S" in the unsupervised fine-tuning paper)
  config: str
  arch: str
  checkpoint: str  # a `CHECKPOINTS` name; "": the config's own init_from (digits)
  numbers: Mapping[str, tuple[float, float | None]]  # column label -> (mean, std)
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  missing: str = ""  # why it cannot run here yet; "" when it can


@dataclasses.dataclass(frozen=True)
class Table:
  paper: str  # one of PAPERS
  number: int
  title: str  # the paper's caption, shortened
  metric: str  # what the numbers are, e.g. "top-1 accuracy (%)"
  columns: tuple[Column, ...]
  rows: tuple[Row, ...]
  notes: str = ""  # transcription notes (e.g. what the extracted text left ambiguous)

  @property
  def name(self) -> str:
    return f"{self.paper} table {self.number}" if self.paper else self.title
