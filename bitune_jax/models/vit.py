"""Vision Transformers (pre-norm) in the layouts of timm / DeiT / DINO / MAE, OpenAI CLIP's
visual tower and DINOv2, NHWC.

    images [B, H, W, 3] -> patch_embed (a strided conv, p x p) -> tokens [B, N, D]
    -> [cls] + tokens, + pos_embed -> (DINOv2: registers after cls) -> (CLIP: ln_pre)
    -> blocks_i: x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x))
    -> norm (CLIP: ln_post) of the class token -> (CLIP: @ proj) = features [B, F]

Variable names (one tree for every source; the converter maps each source's names):
`patch_embed/{kernel, bias}`, `cls_token [1, 1, D]`, `pos_embed [1, 1 + g*g, D]` (the
class token's first, g the checkpoint's grid), `reg_tokens [1, R, D]`, `ln_pre`,
`blocks_{i}/{norm1, attn/qkv, attn/proj, ls1, norm2, mlp/fc1, mlp/fc2, ls2}`, `norm`,
`proj [D, P]`. `attn/qkv`'s kernel is `[D, 3D]`, its output split (3, heads, head_dim)
as timm's fused `qkv` and CLIP's `in_proj_weight` (rows q, k, v) both are.

An input whose patch grid is not the checkpoint's gets the position grid resized
bicubically as PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` does
(`resize_bicubic`); with `pos_offset` (DINOv2's 0.1) through DINOv2's `scale_factor`.
LayerNorms and the attention softmax run in float32; matmuls in `dtype` (bf16 where
asked), through `jax.nn.dot_product_attention`. There is no BatchNorm: the model has no
`batch_stats`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_dense_init = nn.initializers.truncated_normal(0.02)  # timm's Linear init


def cubic_weights(in_size: int, out_size: int, scale_factor: float | None = None,
                  a: float = -0.75) -> np.ndarray:
  """`[out_size, in_size]` matrix of PyTorch's 1-D bicubic interpolation
  (`align_corners=False`, no antialias, coefficient `a`, border pixels repeated).

  Output index o reads source position `(o + 0.5) * s - 0.5`, s = in/out, or
  `1 / scale_factor` when one is given (PyTorch then maps with the factor, not the
  sizes' ratio: DINOv2's +0.1 offset relies on that)."""
  scale = np.float32(1.0 / scale_factor if scale_factor else in_size / out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  left = np.floor(src)
  t = (src - left).astype(np.float64)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  taps = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)  # [out, 4]
  weights = np.zeros((out_size, in_size))
  for k in range(4):
    index = np.clip(left.astype(np.int64) - 1 + k, 0, in_size - 1)
    np.add.at(weights, (np.arange(out_size), index), taps[:, k])
  return weights.astype(np.float32)


def resize_bicubic(grid: jax.Array, size: tuple[int, int],
                   scale_factor: tuple[float, float] | None = None) -> jax.Array:
  """`[h, w, C] -> [size[0], size[1], C]` as PyTorch's `F.interpolate(x, size or
  scale_factor, mode="bicubic", align_corners=False)` on the `[1, C, h, w]` layout.
  (`jax.image.resize`'s bicubic uses a = -0.5 and other borders.)"""
  h, w = grid.shape[:2]
  sh, sw = scale_factor or (None, None)
  rows = jnp.asarray(cubic_weights(h, size[0], sh))
  cols = jnp.asarray(cubic_weights(w, size[1], sw))
  return jnp.einsum("Hh,hwc,Ww->HWc", rows, grid.astype(jnp.float32), cols,
                    precision=jax.lax.Precision.HIGHEST)


def quick_gelu(x):
  """CLIP's activation: `x * sigmoid(1.702 x)`."""
  return x * jax.nn.sigmoid(1.702 * x)


def _exact_gelu(x):
  return nn.gelu(x, approximate=False)


def layer_norm(x, epsilon, dtype, name):
  """LayerNorm `name` (params `scale`, `bias`) over the last axis, computed in float32,
  returned in `dtype`. Call inside a compact module."""
  return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32,
                      name=name)(x.astype(jnp.float32)).astype(dtype)


def drop_path(y, rate, rng):
  """Stochastic depth: each example's `y` (axis 0) zeroed with probability `rate`, kept
  ones scaled by 1 / (1 - rate) (timm's `drop_path`, `scale_by_keep`)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
  return y * (mask / keep).astype(y.dtype)


class Attention(nn.Module):
  """Multi-head self-attention: fused `qkv` Dense `[D, 3D]` (output split as
  (3, heads, head_dim)), scaled dot product with a float32 softmax, Dense `proj`."""
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    qkv = nn.Dense(3 * d, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_dense_init,
                   name="qkv")(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.heads, d // self.heads), 2, 0)
    y = jax.nn.dot_product_attention(q, k, v)  # [B, N, heads, head_dim]
    return nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_dense_init,
                    name="proj")(y.reshape(b, n, d))


class Mlp(nn.Module):
  """Dense `fc1` (D -> hidden), the activation, Dense `fc2` (hidden -> D)."""
  hidden: int
  activation: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda width, name: nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32,
                                         kernel_init=_dense_init, name=name)
    return dense(x.shape[-1], "fc2")(self.activation(dense(self.hidden, "fc1")(x)))


class Block(nn.Module):
  """Pre-norm block; LayerScale (`ls1`, `ls2`, DINOv2) when `layer_scale`; drop-path
  (stochastic depth per example) at rate `drop_path` in training when the call has a
  `dropout` rng (the query encoder's forward; a momentum key encoder's forward is called
  without one: its targets are not dropped, as DINO's teacher's)."""
  heads: int
  mlp_dim: int
  epsilon: float
  activation: Any
  layer_scale: bool = False
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    d = x.shape[-1]

    def branch(y, name):
      if self.layer_scale:
        y = y * self.param(name, nn.initializers.constant(1e-5), (d,), jnp.float32
                           ).astype(y.dtype)
      if train and self.drop_path > 0 and self.has_rng("dropout"):
        y = drop_path(y, self.drop_path, self.make_rng("dropout"))
      return y

    norm = lambda y, name: layer_norm(y, self.epsilon, self.dtype, name)
    x = x + branch(Attention(self.heads, dtype=self.dtype, name="attn")(norm(x, "norm1")),
                   "ls1")
    return x + branch(Mlp(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")(
        norm(x, "norm2")), "ls2")


class ViT(nn.Module):
  """Backbone: images `[B, H, W, 3]` (normalised) -> features `[B, F]` (float32).

  Attributes:
    patch: patch size p (H and W are cut into p x p patches; a remainder is dropped, as
      a stride-p conv does).
    width, depth, heads, mlp_dim: D, blocks, attention heads, the MLP's hidden width.
    grid: g, the side of the position grid the parameters hold (224 / p for the usual
      checkpoints, 37 for DINOv2's 518-pixel one).
    epsilon: LayerNorm epsilon (1e-6 timm, DINO, DINOv2; 1e-5 CLIP).
    clip: OpenAI CLIP's visual tower: QuickGELU, a bias-free patch conv, `ln_pre` before
      the blocks, `ln_post` (here `norm`) on the class token and `proj` to `proj_dim`.
    layer_scale, num_registers: DINOv2's LayerScale and register tokens.
    pos_offset: DINOv2's (and DINO's) +0.1 in the position grid's scale factor.
    drop_path: the last block's drop-path rate (linear from 0 over the depth, as timm).
    dtype: activation dtype (parameters stay float32).
  """
  patch: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  grid: int
  epsilon: float = 1e-6
  clip: bool = False
  proj_dim: int = 0
  layer_scale: bool = False
  num_registers: int = 0
  pos_offset: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @property
  def num_features(self):
    return self.proj_dim if self.clip else self.width

  @property
  def stage_blocks(self):
    """The blocks whose outputs are DELTA's "stages": the last of each quarter."""
    return tuple(sorted({max(round(self.depth * q / 4) - 1, 0) for q in (1, 2, 3, 4)}))

  def position_embedding(self, pos, rows, cols):
    """`pos_embed [1, 1 + g*g, D]` for a `rows x cols` patch grid."""
    if (rows, cols) == (self.grid, self.grid):
      return pos
    scale = None
    if self.pos_offset:
      scale = ((rows + self.pos_offset) / self.grid, (cols + self.pos_offset) / self.grid)
    grid = resize_bicubic(pos[0, 1:].reshape(self.grid, self.grid, -1), (rows, cols), scale)
    return jnp.concatenate([pos[:, :1], grid.reshape(1, rows * cols, -1)], axis=1)

  @nn.compact
  def __call__(self, images, train=False, return_stages=False, channel_scale=None):
    """Features `[B, F]`; with `return_stages`, also `{blocks_<i>: tokens [B, T, D]}` for
    the blocks of `stage_blocks`. `channel_scale`: `{blocks_<i>: [D]}` multipliers of
    those blocks' output channels before the rest of the network reads them (DELTA's
    channel attention zeroes one)."""
    x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", use_bias=not self.clip, dtype=self.dtype,
                param_dtype=jnp.float32, name="patch_embed")(images.astype(self.dtype))
    b, rows, cols, d = x.shape
    x = x.reshape(b, rows * cols, d)
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d), jnp.float32)
    pos = self.param("pos_embed", _dense_init, (1, 1 + self.grid ** 2, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
    x = x + self.position_embedding(pos, rows, cols).astype(x.dtype)
    if self.num_registers:
      reg = self.param("reg_tokens", _dense_init, (1, self.num_registers, d), jnp.float32)
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg, (b,) + reg.shape[1:]).astype(
          x.dtype), x[:, 1:]], axis=1)
    if self.clip:
      x = layer_norm(x, self.epsilon, self.dtype, "ln_pre")
    stages, scale = {}, channel_scale or {}
    for i in range(self.depth):
      rate = self.drop_path * i / max(self.depth - 1, 1)
      x = Block(self.heads, self.mlp_dim, self.epsilon,
                quick_gelu if self.clip else _exact_gelu, layer_scale=self.layer_scale,
                drop_path=rate, dtype=self.dtype, name=f"blocks_{i}")(x, train)
      name = f"blocks_{i}"
      if name in scale:
        x = x * scale[name].astype(x.dtype)
      if i in self.stage_blocks:
        stages[name] = x
    features = layer_norm(x[:, 0], self.epsilon, jnp.float32, "norm")
    if self.clip:
      proj = self.param("proj", nn.initializers.normal(d ** -0.5), (d, self.proj_dim),
                        jnp.float32)
      features = features @ proj
    return (features, stages) if return_stages else features


_TIMM = dict(epsilon=1e-6, grid=14, patch=16)
_DINOV2 = dict(epsilon=1e-6, grid=37, patch=14, layer_scale=True, pos_offset=0.1)
VARIANTS = {
    "vit_s16": dict(width=384, depth=12, heads=6, mlp_dim=1536, **_TIMM),
    "vit_b16": dict(width=768, depth=12, heads=12, mlp_dim=3072, **_TIMM),
    "vit_l16": dict(width=1024, depth=24, heads=16, mlp_dim=4096, **_TIMM),
    "clip_vit_b16": dict(width=768, depth=12, heads=12, mlp_dim=3072, epsilon=1e-5,
                         grid=14, patch=16, clip=True, proj_dim=512),
    "dinov2_vit_s14": dict(width=384, depth=12, heads=6, mlp_dim=1536, **_DINOV2),
    "dinov2_vit_b14": dict(width=768, depth=12, heads=12, mlp_dim=3072, **_DINOV2),
    "dinov2_vit_s14_reg4": dict(width=384, depth=12, heads=6, mlp_dim=1536,
                                num_registers=4, **_DINOV2),
    "dinov2_vit_b14_reg4": dict(width=768, depth=12, heads=12, mlp_dim=3072,
                                num_registers=4, **_DINOV2),
    # Sized for the offline demo's 32 x 32 digits: 4 x 4 patches, an 8 x 8 grid.
    "vit_demo": dict(width=64, depth=4, heads=4, mlp_dim=128, epsilon=1e-6, grid=8,
                     patch=4),
}


def flops_per_image(arch: str, image_size: int) -> int:
  """The forward pass's multiply-adds x 2 of `VARIANTS[arch]` on one square image: the
  patch conv, the qkv / proj / MLP matmuls and the two attention products per block,
  and CLIP's `proj` (LayerNorms, softmax, GELU and the additions not counted)."""
  v = VARIANTS[arch]
  d, p = v["width"], v["patch"]
  n = (image_size // p) ** 2
  t = n + 1 + v.get("num_registers", 0)
  per_block = t * (3 * d * d + d * d + 2 * d * v["mlp_dim"]) + 2 * t * t * d
  total = n * p * p * 3 * d + v["depth"] * per_block + (d * v.get("proj_dim", 0))
  return 2 * total


__all__ = ["VARIANTS", "ViT", "cubic_weights", "drop_path", "flops_per_image",
           "quick_gelu", "resize_bicubic"]
