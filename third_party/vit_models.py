"""PyTorch Vision Transformers written here, in the exact parameter names of the projects
whose checkpoints the converter reads, for the converter's parity tests:

- `TimmViT`: timm's `VisionTransformer` names (`patch_embed.proj`, `cls_token`,
  `pos_embed`, `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`,
  `head`), which DeiT, DINO and MAE's encoder share; with `layer_scale` and
  `num_registers` it is DINOv2's (`ls1.gamma`, `ls2.gamma`, `register_tokens`,
  `mask_token`).
- `MaeViT`: MAE's pre-training model, the encoder above and its decoder (`decoder_*`,
  `mask_token`).
- `ClipVisual` / `Clip`: OpenAI CLIP's visual tower (`conv1` without bias,
  `class_embedding`, `positional_embedding`, `ln_pre`, `transformer.resblocks.{i}.{ln_1,
  attn (nn.MultiheadAttention: in_proj_weight, out_proj), ln_2, mlp.c_fc, mlp.c_proj}`,
  `ln_post`, `proj`) and a small text tower beside it, as its full state dict has.

Each `features(x)` (NCHW) returns what the source's recipe feeds a classifier: the class
token after the final norm; CLIP: `ln_post(class token) @ proj`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):

  def __init__(self, dim, hidden, act):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act, nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

  def forward(self, x):
    return x * self.gamma


class Block(nn.Module):

  def __init__(self, dim, heads, mlp_dim, eps, layer_scale):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=eps)
    self.attn = Attention(dim, heads)
    self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
    self.norm2 = nn.LayerNorm(dim, eps=eps)
    self.mlp = Mlp(dim, mlp_dim, nn.GELU())  # exact (erf)
    self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):

  def __init__(self, patch, dim, bias=True):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, stride=patch, bias=bias)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


class TimmViT(nn.Module):
  """timm / DeiT / DINO / MAE-encoder names; DINOv2's with `layer_scale`, `dinov2`.

  `offset`: the position grid resized with `scale_factor = (g' + offset) / g` (DINO and
  DINOv2) instead of to the size g' (timm's `resample_abs_pos_embed` without antialias).
  """

  def __init__(self, *, patch=16, dim=64, depth=2, heads=4, mlp_dim=128, grid=4,
               num_classes=0, layer_scale=False, num_registers=0, dinov2=False, offset=0.0,
               eps=1e-6):
    super().__init__()
    self.patch, self.grid, self.offset = patch, grid, offset
    self.patch_embed = PatchEmbed(patch, dim)
    self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
    self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + grid * grid, dim))
    if dinov2:
      self.mask_token = nn.Parameter(torch.zeros(1, dim))
      if num_registers:
        self.register_tokens = nn.Parameter(0.02 * torch.randn(1, num_registers, dim))
    self.num_registers = num_registers
    self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, eps, layer_scale)
                                for _ in range(depth))
    self.norm = nn.LayerNorm(dim, eps=eps)
    self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()

  def pos(self, rows, cols):
    if (rows, cols) == (self.grid, self.grid):
      return self.pos_embed
    grid = self.pos_embed[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
    if self.offset:
      grid = F.interpolate(grid, mode="bicubic", align_corners=False, scale_factor=(
          (rows + self.offset) / self.grid, (cols + self.offset) / self.grid))
    else:
      grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
    assert grid.shape[-2:] == (rows, cols), grid.shape
    return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], 1)

  def features(self, x):
    rows, cols = x.shape[2] // self.patch, x.shape[3] // self.patch
    x = self.patch_embed(x)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos(rows, cols)
    if self.num_registers:
      x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], 1)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)[:, 0]

  def forward(self, x):
    return self.head(self.features(x))


class MaeViT(TimmViT):
  """MAE's pre-training model: the encoder (timm's names) and the decoder."""

  def __init__(self, *, decoder_dim=32, decoder_depth=1, **kwargs):
    super().__init__(**kwargs)
    dim, n = self.pos_embed.shape[-1], self.pos_embed.shape[1]
    self.decoder_embed = nn.Linear(dim, decoder_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
    self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n, decoder_dim),
                                          requires_grad=False)
    self.decoder_blocks = nn.ModuleList(Block(decoder_dim, 4, 2 * decoder_dim, 1e-6, False)
                                        for _ in range(decoder_depth))
    self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
    self.decoder_pred = nn.Linear(decoder_dim, self.patch ** 2 * 3)


class QuickGELU(nn.Module):

  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class ClipMlp(nn.Sequential):

  def __init__(self, dim):
    super().__init__()
    self.add_module("c_fc", nn.Linear(dim, 4 * dim))
    self.add_module("gelu", QuickGELU())
    self.add_module("c_proj", nn.Linear(4 * dim, dim))


class ResidualAttentionBlock(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.attn = nn.MultiheadAttention(dim, heads)
    self.ln_1 = nn.LayerNorm(dim)
    self.mlp = ClipMlp(dim)
    self.ln_2 = nn.LayerNorm(dim)

  def forward(self, x):  # [L, B, D], sequence first as CLIP's
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):

  def __init__(self, dim, depth, heads):
    super().__init__()
    self.resblocks = nn.Sequential(*[ResidualAttentionBlock(dim, heads)
                                     for _ in range(depth)])

  def forward(self, x):
    return self.resblocks(x)


class ClipVisual(nn.Module):
  """OpenAI CLIP's `VisionTransformer` (LayerNorm eps 1e-5)."""

  def __init__(self, *, patch=16, dim=64, depth=2, heads=4, grid=4, out_dim=32):
    super().__init__()
    self.conv1 = nn.Conv2d(3, dim, patch, stride=patch, bias=False)
    scale = dim ** -0.5
    self.class_embedding = nn.Parameter(scale * torch.randn(dim))
    self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, dim))
    self.ln_pre = nn.LayerNorm(dim)
    self.transformer = Transformer(dim, depth, heads)
    self.ln_post = nn.LayerNorm(dim)
    self.proj = nn.Parameter(scale * torch.randn(dim, out_dim))

  def forward(self, x):
    x = self.conv1(x).flatten(2).permute(0, 2, 1)  # [B, N, D]
    cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding)
    x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    return self.ln_post(x[:, 0]) @ self.proj

  features = forward


class Clip(nn.Module):
  """OpenAI CLIP: `visual` and a text tower (its names: `token_embedding`,
  `positional_embedding`, `transformer`, `ln_final`, `text_projection`, `logit_scale`)."""

  def __init__(self, *, vocab=50, context=8, text_dim=32, **visual):
    super().__init__()
    self.visual = ClipVisual(**visual)
    self.token_embedding = nn.Embedding(vocab, text_dim)
    self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, text_dim))
    self.transformer = Transformer(text_dim, 1, 4)
    self.ln_final = nn.LayerNorm(text_dim)
    self.text_projection = nn.Parameter(torch.randn(text_dim, visual.get("out_dim", 32)))
    self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

  def forward(self, image):
    return self.visual(image)


def to_half_as_openai(model):
  """OpenAI's release casts the convs, linears, attention projections, `proj` and
  `text_projection` to float16 and leaves the LayerNorms and embeddings float32."""
  for module in model.modules():
    if isinstance(module, (nn.Conv2d, nn.Linear)):
      module.weight.data = module.weight.data.half()
      if module.bias is not None:
        module.bias.data = module.bias.data.half()
    if isinstance(module, nn.MultiheadAttention):
      for name in ("in_proj_weight", "in_proj_bias"):
        getattr(module, name).data = getattr(module, name).data.half()
  for name in ("proj", "text_projection"):
    for module in model.modules():
      if isinstance(getattr(module, name, None), nn.Parameter):
        getattr(module, name).data = getattr(module, name).data.half()
  return model
