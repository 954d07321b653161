"""Unsupervised fine-tuning Table 5: semi-supervised learning (FixMatch) on Caltech101,
Pet, CIFAR100 and Food101 initialised from the ImageNet unsupervised pre-trained
ResNet-50 (Unsup-S) or from its proposed unsupervised fine-tuning, transcribed from
the unsupervised fine-tuning paper.

Setting: "we leverage the state-of-the-art semi-supervised learning method FixMatch
[28], and use the original unsupervised pretrained representation and unsupervised
finetuned representation as the initialization respectively." The caption: ""Semi-K"
means K labeled samples together with the whole unlabeled data are used for
semi-supervised learning. Other annotations are similar as Table 2." So a column is
the test accuracy of a FixMatch run with K labelled images per class (eval ""; kshot K:
`data.kshot`) and the whole training set unlabelled; "we ... report the mean class
accuracy for Pet, Caltech101 and top-1 accuracy for other datasets"; each number is
the mean of three trials, no std printed. Unsup-S is MoCo v2 ("For unsupervised
pretraining, we use MocoV2[9] ... All the pretraining models are trained with 800
epochs.", at batch 2048; `moco_v2_resnet50` is the nearest public checkpoint, not the
same weights). "+ Our Unsupft-T" starts FixMatch from the `unsup_finetune` model
(defaults: 10% source replay and CutMix) fine-tuned from Unsup-S on the same dataset:
its checkpoint is `unsupft_resnet50`, given per dataset (`bitune-sweep --checkpoint
unsupft_resnet50@pets=FILE`, FILE the `bitune-export` of that dataset's
`unsup_finetune` run, e.g. from the sweep of Table 2).

Transcription notes: the gains printed in parentheses and the Avg column (which agree
with the numbers) are not transcribed. The extraction prints the first block's
second-row K as "Sellii-2 Acc" (read "Semi-2 Acc") and the row label
"+ Our Unsupft- T" (read "+ Our Unsupft-T").
"""

from bitune_jax.configs.tables import Column, Row, Table

_DATASETS = (("Caltech101", "caltech101"), ("Pet", "pets"), ("CIFAR100", "cifar100"),
             ("Food101", "food101"))
_KS = (2, 4, 8)
_COLUMNS = tuple(Column(f"{name} Semi-{k}", dataset, kshot=k)
                 for k in _KS for name, dataset in _DATASETS)


def _numbers(blocks):
  """{K: (Caltech101, Pet, CIFAR100, Food101)} -> {column label: (mean, None)}."""
  if tuple(blocks) != _KS:
    raise ValueError(f"K {tuple(blocks)}, expected {_KS}")
  return {f"{name} Semi-{k}": (v, None) for k, values in blocks.items()
          for (name, _), v in zip(_DATASETS, values, strict=True)}


TABLE = Table(
    paper="unsupervised-finetuning", number=5,
    title="Semi-supervised learning results by using different models as "
          "initialization",
    metric="FixMatch test accuracy (%; mean class accuracy on Caltech101 and Pet, "
           "top-1 on CIFAR100 and Food101)",
    columns=_COLUMNS,
    rows=(
        Row("Unsup-S", "fixmatch", "resnet50", "moco_v2_resnet50", _numbers({
            2: (79.04, 54.52, 41.43, 18.23),
            4: (86.07, 68.18, 61.54, 34.67),
            8: (90.12, 75.39, 70.59, 59.06)})),
        Row("+ Our Unsupft-T", "fixmatch", "resnet50", "unsupft_resnet50", _numbers({
            2: (82.84, 68.58, 56.35, 70.33),
            4: (86.87, 73.25, 66.18, 79.35),
            8: (90.27, 79.18, 71.65, 82.35)})),
    ),
    notes="Both rows are FixMatch; the second starts from each dataset's "
          "unsup_finetune model (unsupft_resnet50@<dataset>).")
