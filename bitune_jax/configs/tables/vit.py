"""Beyond the papers (this project's own table, no paper numbers): Bi-tuning, Co-Tuning
and vanilla fine-tuning of Vision Transformers pre-trained without ImageNet labels
(DINO ViT-B/16, OpenAI CLIP ViT-B/16, DINOv2 ViT-B/14) on CUB-200-2011, Stanford Cars
and FGVC Aircraft at sampling rates 25 / 50 / 100%.

  bitune-sweep --spec configs/tables/vit.py --workdir DIR --print_commands
  bitune-sweep --spec configs/tables/vit.py --workdir DIR --seeds 0,1,2 \
      --checkpoint dino_vit_b16=dino_b16.npz --checkpoint clip_vit_b16=clip_b16.npz \
      --checkpoint dinov2_vit_b14=dinov2_b14.npz --checkpoint supervised_vit_b16=vitb16.npz

Every run is `configs/<method>.py:<dataset>,<arch>,<rate>` with the ViT recipe (AdamW,
layer-wise decay 0.65, warmup + cosine, drop-path 0.1, 224 px; `config_base`), each
checkpoint converted by `bitune-convert` (README, "Converting PyTorch checkpoints").

Co-Tuning needs the pre-trained model's own classifier over its pre-training classes,
p(y_s | x), on the features it fine-tunes. DINO, DINOv2 and CLIP are released without
one on these features (DINO's and DINOv2's linear heads read the class token
concatenated with the patch tokens' average, 1536 values; CLIP's zero-shot classifier
is its text tower's embeddings of the class names), so its rows use the ImageNet
supervised ViT-B/16 of timm, whose 1000-way head the converter keeps.
"""

from bitune_jax.configs.tables import Column, Row, Table

_RATES = (25, 50, 100)
_DATASETS = (("CUB", "cub"), ("Cars", "cars"), ("Aircraft", "aircraft"))
_COLUMNS = tuple(Column(f"{label} {rate}%", name, rate=rate)
                 for label, name in _DATASETS for rate in _RATES)
_BACKBONES = (("DINO ViT-B/16", "vit_b16", "dino_vit_b16"),
              ("CLIP ViT-B/16", "clip_vit_b16", "clip_vit_b16"),
              ("DINOv2 ViT-B/14", "dinov2_vit_b14", "dinov2_vit_b14"))

TABLE = Table(
    paper="", number=0,
    title="ViT grid",
    metric="test top-1 accuracy (%)",
    columns=_COLUMNS,
    rows=tuple(Row(f"{method_label} ({backbone})", method, arch, checkpoint, {})
               for backbone, arch, checkpoint in _BACKBONES
               for method_label, method in (("vanilla fine-tuning", "finetune"),
                                            ("Bi-tuning", "bituning")))
    + (Row("vanilla fine-tuning (supervised ViT-B/16)", "finetune", "vit_b16",
           "supervised_vit_b16", {}),
       Row("Co-Tuning (supervised ViT-B/16)", "cotuning", "vit_b16", "supervised_vit_b16",
           {})),
    notes="Our own runs; the three self-supervised checkpoints have no source "
          "classifier on their features, so Co-Tuning runs from the supervised "
          "ViT-B/16 (module docstring).")
