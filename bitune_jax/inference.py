"""Using a fine-tuned model: `load(path)` of a `bitune-export` file gives a jitted
`images -> {"logits", "features"}` and the preprocessing the model was trained with.

    model = inference.load("model.npz")
    out = model(model.preprocess(["cat.jpg", "dog.png"]))   # or decoded uint8 images
    classes = out["logits"].argmax(-1)
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bitune_jax import convert
from bitune_jax.methods import common


@dataclasses.dataclass
class Model:
  """A loaded model: `model(images) -> {"logits" [N, C], "features" [N, F]}` on
  preprocessed images `[N, S, S, 3]`; `preprocess(files or uint8 images)` makes them."""
  report: dict
  apply: Callable[[Any], dict]

  def __call__(self, images):
    return jax.device_get(self.apply(jnp.asarray(images, jnp.float32)))

  def preprocess(self, images):
    """Image files (paths) or decoded images (uint8 `[H, W, 3]`, or `[H, W]` grey) ->
    float32 `[N, S, S, 3]`, as the model's eval view made them."""
    spec = self.report["preprocessing"]
    return np.stack([_preprocess_one(_decode(x), spec) for x in images])


def load(path):
  """The model in a `bitune-export` file (a classifier head is required)."""
  result = convert.load_converted(path)
  report = result["report"]
  if "head" not in result or "preprocessing" not in report:
    raise ValueError(f"{path} is not a bitune-export file (no classifier head or "
                     "preprocessing); converted PyTorch checkpoints are loaded for "
                     "fine-tuning with --config.init_from")
  network = common.Network(arch=report["arch"], num_classes=int(report["num_classes"]))
  params = {"backbone": result["backbone"]["params"], "head": {"dense": result["head"]}}
  variables = {"params": params,
               "batch_stats": {"backbone": result["backbone"]["batch_stats"]}}
  apply = jax.jit(lambda x: {k: v for k, v in network.apply(variables, x,
                                                            train=False).items()
                             if k in ("logits", "features")})
  return Model(report=report, apply=apply)


def _decode(image):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
    with Image.open(image) as f:
      return np.asarray(f.convert("RGB"))
  return np.asarray(image)


def _preprocess_one(image, spec):
  """One decoded image -> the evaluation view a run makes of it (`data.pipeline`): the
  cache's PIL bilinear resize to S x S in uint8, the centre crop, normalisation."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from bitune_jax.data import cache, digits  # pylint: disable=g-import-not-at-top
  size = spec["image_size"]
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if spec["kind"] == "digits":  # grey 8x8, as scikit-learn's (area averaging)
    grey = Image.fromarray(image.astype(np.uint8)).convert("L").resize((8, 8), Image.BOX)
    return digits.eval_images(np.asarray(grey)[None], size)[0]
  resized = cache.resize_image(image.astype(np.uint8), spec["resize"])[None]
  offset = (spec["resize"] - size) // 2
  crop = resized[:, offset:offset + size, offset:offset + size].astype(np.float32) / 255
  return ((crop[0] - np.asarray(spec["mean"], np.float32)) /
          np.asarray(spec["std"], np.float32)).astype(np.float32)
