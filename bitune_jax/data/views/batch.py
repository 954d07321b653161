"""The views of a batch, inside the jitted train step: `make_views(spec)`.

Every random choice comes from a key folding the run's seed with the step, the
example's row in the global batch and the view number (`view_key`), so the pixels
depend only on (seed, step, global row, view): not on the number of devices nor on how
the batch is sharded, and a resumed run redraws the same views.

Kinds (`ViewSpec.kind`): "reference" and "moco" (`bitune_jax.data.views.augment`; one
view `image`, or two, `image_q` and `image_k`), and "weak_strong"
(`bitune_jax.data.views.weak_strong`: a weak view of the labelled images, a weak and a
strong view of the unlabelled ones).
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from bitune_jax.data.views.augment import moco_view, reference_train_view
from bitune_jax.data.views.colour import DEFAULT_JITTER
from bitune_jax.data.views.weak_strong import strong_view, weak_view

KINDS = ("reference", "moco", "weak_strong")


def view_key(seed: int | jax.Array, step: int | jax.Array, row: int | jax.Array,
             view: int | jax.Array) -> jax.Array:
  """The key of one view: `jax.random.key(seed)` folded with the step, the example's
  row in the global batch, then the view number."""
  key = jax.random.key(seed)
  for part in (step, row, view):
    key = jax.random.fold_in(key, part)
  return key


def batch_views(images_u8: jax.Array, *, seed: int | jax.Array, step: int | jax.Array,
                rows: jax.Array, view: int, size: int, kind: str = "reference",
                hw: jax.Array | None = None, scale: tuple[float, float] | None = None,
                flip: bool = True,
                jitter: Sequence[float] | None = None) -> jax.Array:
  """A view of each uint8 `[B, S, S, 3]` image, each with its own key
  `view_key(seed, step, rows[b], view)`.

  Args:
    images_u8: uint8 `[B, S, S, 3]` cache images.
    seed, step: the run's seed and the step (may be traced).
    rows: int `[B]`, each image's row in the global batch.
    view: the view number (0, 1: query, key).
    size: output side (static).
    kind: "reference" (`reference_train_view`) or "moco" (`moco_view`).
    hw: int `[B, 2]` original (height, width) of each image: needed by "moco", unused
      by "reference".
    scale: area range of the crop; None: the kind's default ((0.08, 1) reference,
      (0.2, 1) moco).
    flip: False: never flip.
    jitter: colour jitter strengths (b, c, s, h). Reference: None, no jitter. MoCo:
      None, `DEFAULT_JITTER` (applied with p 0.8).

  Returns:
    float32 `[B, size, size, 3]`, normalised.
  """
  if kind not in ("reference", "moco"):
    raise ValueError(f"kind must be 'reference' or 'moco', got {kind!r}")
  if kind == "moco" and hw is None:
    raise ValueError("moco views need the original image sizes hw [B, 2]")
  if kind == "reference":
    options = dict(size=size, scale=scale or (0.08, 1.0), flip=flip, jitter=jitter)

    def one(image, row):
      return reference_train_view(image, view_key(seed, step, row, view), **options)
    return jax.vmap(one)(images_u8, rows)
  options = dict(size=size, scale=scale or (0.2, 1.0), flip=flip,
                 jitter=DEFAULT_JITTER if jitter is None else jitter)

  def one_moco(image, image_hw, row):
    return moco_view(image, image_hw, view_key(seed, step, row, view), **options)
  return jax.vmap(one_moco)(images_u8, jnp.asarray(hw, jnp.int32), rows)


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """How a run's training views are made (see `make_views`)."""
  kind: str  # one of KINDS
  size: int
  seed: int
  two_views: bool  # reference and moco: image_q and image_k, else image
  scale: tuple[float, float] | None = None  # None: the kind's default
  flip: bool = True
  jitter: tuple[float, float, float, float] | None = None  # reference views only


def make_views(spec: ViewSpec) -> Callable[[dict, jax.Array], dict]:
  """`views(batch, step) -> batch`, a JAX function for inside the jitted train step: the
  uint8 `image_u8` (and `hw`) of a global batch become float32 `image_q`, `image_k`
  (two views) or `image` (one), view v of row r drawn from `view_key(seed, step, r,
  v)`; the other entries are passed through. Kind "weak_strong": `_weak_strong_views`."""
  if spec.kind not in KINDS:
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {spec.kind!r}")
  if spec.kind == "weak_strong":
    return _weak_strong_views(spec)
  names = ("image_q", "image_k") if spec.two_views else ("image",)
  options = dict(size=spec.size, kind=spec.kind, flip=spec.flip)
  if spec.scale is not None:
    options["scale"] = tuple(spec.scale)
  if spec.jitter is not None:
    options["jitter"] = tuple(spec.jitter)

  def views(batch, step):
    out = {k: v for k, v in batch.items() if k not in ("image_u8", "hw")}
    rows = jnp.arange(batch["image_u8"].shape[0])  # rows of the global batch (jit)
    for number, name in enumerate(names):
      out[name] = batch_views(batch["image_u8"], hw=batch["hw"], seed=spec.seed,
                              step=step, rows=rows, view=number, **options)
    return out

  return views


def _weak_strong_views(spec):
  """The labelled images' weak view `image` (view 0), and of the unlabelled `u_image_u8`
  a weak `u_weak` (view 1) and a strong `u_strong` (view 2), each keyed by (seed, step,
  row, view)."""

  def each(view_fn, images, step, view):
    rows = jnp.arange(images.shape[0])
    keys = jax.vmap(lambda r: view_key(spec.seed, step, r, view))(rows)
    return jax.vmap(lambda x, k: view_fn(x, k, size=spec.size))(images, keys)

  def views(batch, step):
    out = {k: v for k, v in batch.items()
           if k not in ("image_u8", "hw", "u_image_u8", "u_hw")}
    out["image"] = each(weak_view, batch["image_u8"], step, 0)
    out["u_weak"] = each(weak_view, batch["u_image_u8"], step, 1)
    out["u_strong"] = each(strong_view, batch["u_image_u8"], step, 2)
    return out
  return views
