"""CutMix on device (jit-able), for the mixed queries of unsupervised fine-tuning.

`q_m = M * q_a + (1 - M) * q_b`: a box of `q_b` pasted into `q_a` (Yun et al. 2019);
lambda ~ Beta(alpha, alpha) sets the box (side ratio sqrt(1 - lambda), centre uniform,
clipped to the image), and the returned lambda is the area of `q_a` that remains,
the weight of `q_a`'s key in Eq. (6) of the unsupervised fine-tuning paper.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def cutmix_boxes(
    rng: jax.Array, *, batch: int, height: int, width: int, alpha: float = 1.0
) -> tuple[tuple[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]:
  """Per-example boxes `(y0, y1, x0, x1)` (each `[B]` int32, half-open) and lambda `[B]`."""
  lam_rng, y_rng, x_rng = jax.random.split(rng, 3)
  lam = jax.random.beta(lam_rng, alpha, alpha, (batch,))
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(y_rng, (batch,), 0, height)
  cx = jax.random.randint(x_rng, (batch,), 0, width)
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + cut_h // 2, 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + cut_w // 2, 0, width)
  area = (y1 - y0) * (x1 - x0)
  return (y0, y1, x0, x1), 1.0 - area / (height * width)


def box_mask(boxes: Sequence[jax.Array], *, height: int, width: int) -> jax.Array:
  """`[B, H, W, 1]` float: 1 where the first image is kept, 0 inside the pasted box."""
  y0, y1, x0, x1 = (b[:, None, None] for b in boxes)
  ys = jnp.arange(height)[None, :, None]
  xs = jnp.arange(width)[None, None, :]
  inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  return (~inside).astype(jnp.float32)[..., None]


def cutmix(rng: jax.Array, images_a: jax.Array, images_b: jax.Array, *,
           alpha: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """`(mixed [B, H, W, C], lam [B])`: boxes of `images_b` pasted into `images_a`."""
  batch, height, width, _ = images_a.shape
  boxes, lam = cutmix_boxes(rng, batch=batch, height=height, width=width, alpha=alpha)
  mask = box_mask(boxes, height=height, width=width).astype(images_a.dtype)
  return mask * images_a + (1 - mask) * images_b, lam
