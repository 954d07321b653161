"""What both manual-directory builders store per example."""

import tensorflow_datasets as tfds


def classification_features(num_classes: int) -> tfds.features.FeaturesDict:
  """`image` (JPEG), `label` (class names set at generation time), `image/filename`."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=num_classes),
      "image/filename": tfds.features.Text(),
  })
