"""Unsupervised fine-tuning Table 1: few-shot transfer on Pet37 and Caltech101 of the
baseline representations (the motivation of the paper), transcribed from
the unsupervised fine-tuning paper.

Setting: "we adopt the existing state-of-the-art unsupervised learning method MoCoV2[9]
on two example target datasets: Caltech101 [12] and Pet [25] ... To evaluate the
quality of the learned representation, we finetune the pretrained model with a few
labeled samples to get the few-shot transfer performance." The rows are
representations and the columns the K-shot transfer of each ("for few-shot transfer,
we randomly choose K labeled samples for each category and finetune the learned
representation with such labeled samples in a supervised way"; "For transfer, we
finetune the model for 30 epochs and the learning rate for the newly added FC layer
and pretrained layers are 3.0 and 0.0001 respectively"). Unsup-S is the ImageNet
MoCo v2 ResNet-50 ("For unsupervised pretraining, we use MocoV2[9] ... the batch size
is 2,048. All the pretraining models are trained with 800 epochs.": the authors' own
800-epoch run at batch 2048, lr 0.24; `moco_v2_resnet50` is the nearest public
checkpoint, not the same weights). Unsupft-T is the naive unsupervised fine-tuning of
Unsup-S on T ("we continue unsupervised learning on the target data with a smaller
learning rate by using the pretrained model as the initialization. The corresponding
transfer performance is shown in the last row of Table 1"): `unsup_finetune` without
source data replay or data mixing. Metric: "we ... report the mean class accuracy for
Pet, Caltech101"; the mean of three trials, no std printed.

Transcription notes: the extracted table has a first row, "Unsup-T" (MoCo v2 trained
from scratch on the target data only; the paper's text gives no numbers for it either,
only that its "few-shot transfer performance is much worse"), with all six cells empty:
it is left out (it would be `unsup_finetune` from checkpoint "none"). The extraction
prints the row labels with an overline ("\\overline{Unsupft-}T") and the caption's
"Unsup-T means the naive unsupervised finetuned model" lost the "ft": the last row is
labelled "Unsupft-T". Its numbers and Unsup-S's equal those of Tables 2 and 6.
"""

from bitune_jax.configs.tables import Column, Row, Table

_SHOTS = (2, 4, 8)
_DATASETS = (("Pet37", "pets"), ("Caltech101", "caltech101"))
_COLUMNS = tuple(Column(f"{name} {k}-shot", dataset, kshot=k, eval="kshot")
                 for name, dataset in _DATASETS for k in _SHOTS)


def _numbers(values):
  return {c.label: (v, None) for c, v in zip(_COLUMNS, values, strict=True)}


TABLE = Table(
    paper="unsupervised-finetuning", number=1,
    title="Few-shot transfer performance on two small-scale target datasets with "
          "different baseline models",
    metric="K-shot transfer accuracy (%), mean class accuracy",
    columns=_COLUMNS,
    rows=(
        Row("Unsup-S", "", "resnet50", "moco_v2_resnet50",
            _numbers([56.84, 68.94, 75.10, 63.12, 76.54, 84.45])),
        Row("Unsupft-T", "unsup_finetune", "resnet50", "moco_v2_resnet50",
            _numbers([55.94, 67.03, 72.92, 68.48, 78.18, 82.03]),
            overrides={"unsup.replay_fraction": 0.0, "unsup.cutmix": False}),
    ),
    notes="The Unsup-T (from scratch on T) row has no numbers in the extracted text "
          "and is left out.")
