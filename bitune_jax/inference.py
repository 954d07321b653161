"""Using a fine-tuned model: `load(path)` of a `bitune-export` file gives a jitted
`images -> {"logits", "features"}` and the preprocessing the model was trained with.

    model = inference.load("model.npz")
    out = model(model.preprocess(["cat.jpg", "dog.png"]))   # or decoded images
    names = [model.class_names[i] for i in out["logits"].argmax(-1)]

`preprocess` takes image files or decoded images: uint8 in [0, 255], or float in
[0, 1] (`plt.imread` of a PNG, `np.asarray(pil_image) / 255`); a float image in another
range (e.g. [0, 255]) is refused, not guessed at.
"""

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bitune_jax import convert
from bitune_jax.methods import common


@dataclasses.dataclass
class Model:
  """A loaded model: `model(images) -> {"logits" [N, C], "features" [N, F]}` on
  preprocessed images `[N, S, S, 3]`; `preprocess(files or images)` makes them;
  `class_names[i]` names logit i."""
  report: dict
  apply: Callable[[Any], dict]

  def __call__(self, images):
    return jax.device_get(self.apply(jnp.asarray(images, jnp.float32)))

  @property
  def class_names(self) -> list[str]:
    """The dataset's name of each class (e.g. "5".."9" for the digits demo); the
    class indices as strings for a file exported without them."""
    names = self.report.get("class_names")
    return list(names) if names else [str(i) for i in range(self.report["num_classes"])]

  def preprocess(self, images):
    """One image or a list of them -> float32 `[N, S, S, 3]`, as the model's eval view
    made them. An image is a file (a path) or a decoded image `[H, W, 3]` (or `[H, W]`
    grey), uint8 in [0, 255] or float in [0, 1]; an array `[N, H, W, 3]` is N images."""
    spec = self.report["preprocessing"]
    return np.stack([_preprocess_one(_decode(x), spec) for x in _as_list(images)])


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


def _is_path(image):
  return isinstance(image, (str, bytes, os.PathLike))


def _as_list(images):
  """`images` as a list of images: a single path or image array becomes a list of one."""
  if _is_path(images):
    return [images]
  if isinstance(images, np.ndarray) or hasattr(images, "__array__"):
    array = np.asarray(images)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
      return [array]  # [H, W] grey or [H, W, C]: one image
    if array.ndim not in (3, 4):
      raise ValueError(f"an image array must be [H, W], [H, W, C] or [N, H, W, C], got "
                       f"shape {array.shape}")
    return list(array)
  return list(images)


def _decode(image):
  """A path or a decoded image -> uint8 `[H, W, 3]` (or `[H, W]` grey)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if _is_path(image):
    with Image.open(image) as f:
      return np.asarray(f.convert("RGB"))
  return _to_uint8(np.asarray(image))


def _to_uint8(image):
  """uint8 as it is; float in [0, 1] (or integers in [0, 255]) scaled and rounded to
  uint8; anything else refused, with the ranges that are accepted."""
  if image.dtype == np.uint8:
    return image
  accepted = "images must be uint8 in [0, 255] or float in [0, 1]"
  if image.size == 0 or image.dtype.kind not in "fiu":
    raise ValueError(f"{accepted}; got an empty image or dtype {image.dtype}")
  lo, hi = float(np.min(image)), float(np.max(image))
  if image.dtype.kind == "f":
    if not (np.isfinite(lo) and np.isfinite(hi) and 0.0 <= lo and hi <= 1.0):
      raise ValueError(f"{accepted}; got a {image.dtype} image with values in "
                       f"[{lo:g}, {hi:g}] (divide a [0, 255] float image by 255)")
    return np.round(image.astype(np.float64) * 255.0).astype(np.uint8)
  if not (0 <= lo and hi <= 255):
    raise ValueError(f"{accepted}; got a {image.dtype} image with values in "
                     f"[{lo:g}, {hi:g}]")
  return image.astype(np.uint8)


def _preprocess_one(image, spec):
  """One decoded image -> the evaluation view a run makes of it (`data.pipeline`): the
  cache's PIL bilinear resize to S x S in uint8, the centre crop, normalisation."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from bitune_jax.data import decode, digits  # pylint: disable=g-import-not-at-top
  size = spec["image_size"]
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:  # grey [H, W, 1]
    image = image[..., 0]
  elif image.ndim == 3 and image.shape[-1] == 4:  # RGBA: the alpha is not looked at
    image = image[..., :3]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if spec["kind"] == "digits":  # grey 8x8, as scikit-learn's (area averaging)
    grey = Image.fromarray(image.astype(np.uint8)).convert("L").resize((8, 8), Image.BOX)
    return digits.eval_images(np.asarray(grey)[None], size)[0]
  resized = decode.resize_image(image.astype(np.uint8), spec["resize"])[None]
  offset = (spec["resize"] - size) // 2
  crop = resized[:, offset:offset + size, offset:offset + size].astype(np.float32) / 255
  return ((crop[0] - np.asarray(spec["mean"], np.float32)) /
          np.asarray(spec["std"], np.float32)).astype(np.float32)
