"""DELTA (Li et al., ICLR 2019): fine-tuning with the backbone's feature maps held near
the pre-trained network's, each channel weighted by its attention, as TLlib (the
authors' group's library, whose DELTA the Bi-tuning and Co-Tuning papers report)
computes it.

Loss: `CE + alpha * Omega + beta * sum_p ||p||^2 / 2` over the new head's parameters p,
with, summed over the regularised maps s (C_s channels of H_s x W_s positions),

  Omega = sum_s 0.5 * C_s / (H_s * W_s) * sum_b sum_c W_sc * ||FM_sc(w, x_b) - FM_sc(w*, x_b)||^2

(a sum over the batch, not a mean: TLlib's `AttentionBehavioralRegularization`), where
w* is the pre-trained backbone, frozen, run in eval mode on the same images.

Which maps (`delta.feature_maps`):
  * "last_conv" (TLlib, the papers' numbers): the output of each stage's last conv
    before its BatchNorm, `layer<i>.<last>.conv3` of a ResNet-50 (`conv2` of a basic
    block); about half of its values are negative. TLlib defines DELTA for ResNets
    only; on a DenseNet we take its analogue, each dense block's concatenated conv
    outputs before the BatchNorm that reads them.
  * "stage_output": each stage's output after the residual add and ReLU (the
    network's `layer1`..`layer4` / `denseblock1`..`denseblock4`); on a ViT, the only
    choice: the tokens `[B, T, D]` after the last block of each quarter of its depth
    (blocks 3, 6, 9, 12 of 12), T positions of D channels (TLlib defines DELTA for
    ResNets; this is our analogue).

Channel attention W (DELTA's supervised attention), measured once before training
with the pre-trained network (`prepare`):
1. a classifier for the target classes is fitted on the frozen pooled features of the
   training images (multinomial logistic regression, L2 `attention_l2`). TLlib means
   to freeze the backbone here and does not (`classifier.backbone.requires_grad =
   False` sets an attribute, not the parameters' flags), so it fine-tunes the whole
   network for 10 epochs; we keep the backbone frozen, as intended: the attention then
   measures the network that is actually regularised towards. (TLlib also measures a
   fresh ImageNet network when fine-tuning from another checkpoint; we measure w*.);
2. for each map s and channel c, the increase of the classifier's mean cross-entropy
   when that channel is zeroed (TLlib zeroes the conv's weight row; the same), run in
   eval mode: `D_sc` = the mean over `attention_batches` random batches of
   `attention_batch_size` training images of each batch's mean increase;
3. `W_s = softmax(zscore(D_s) / attention_temperature)` over the channels of each map
   (zscore: minus the mean, over the population standard deviation; T = 5 in TLlib).

The penalty replaces weight decay (`configs/delta.py` sets 0), as in TLlib. A resumed
run keeps the w* and W of its checkpoint.
"""

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from bitune_jax import losses, models, relationship, sharding
from bitune_jax.data import pipeline
from bitune_jax.methods import base, common

log = logging.getLogger("bitune_jax")


FEATURE_MAPS = ("last_conv", "stage_output")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  alpha: float  # weight of the attention-weighted feature-map distance
  beta: float  # weight of ||w_new||^2 / 2


def regularised_maps(stages, feature_maps):
  """The maps DELTA regularises, of a network's `out["stages"]`: `{name: map}`."""
  if feature_maps not in FEATURE_MAPS:
    raise ValueError(f"delta.feature_maps must be one of {', '.join(FEATURE_MAPS)}, got "
                     f"{feature_maps!r}")
  last_conv = feature_maps == "last_conv"
  return {n: v for n, v in stages.items() if n.endswith("_last_conv") == last_conv}


# --------------------------------------------------------------------------- penalty
def feature_map_penalty(stages, reference, attention):
  """TLlib's DELTA distance, float32:
  `sum_s 0.5 * C_s / (H_s W_s) * sum_{b,c} W_sc * sum_{h,w} (FM - FM*)^2_{b,h,w,c}`.

  Args:
    stages: `{name: [B, H, W, C]}` feature maps of the network being trained (the
      names of `attention`, at least); a ViT's `[B, T, D]` tokens (T positions, D
      channels).
    reference: the same of the pre-trained network (no gradient is taken through it).
    attention: `{name: [C]}` channel weights.
  """
  total = jnp.zeros((), jnp.float32)
  for name, weights in attention.items():
    diff = stages[name].astype(jnp.float32) - jax.lax.stop_gradient(
        reference[name].astype(jnp.float32))
    positions, channels = math.prod(diff.shape[1:-1]), diff.shape[-1]  # H W, or tokens
    per_channel = jnp.sum(jnp.square(diff), axis=tuple(range(diff.ndim - 1)))  # [C]
    total = total + 0.5 * channels / positions * jnp.sum(weights * per_channel)
  return total


def head_penalty(head):
  """`||w_new||^2` (kernel and bias) in float32."""
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(head)),
             jnp.zeros((), jnp.float32))


# --------------------------------------------------------------------------- attention
def attention_weights(increases, *, temperature):
  """`softmax(zscore(D) / temperature)` of one map's loss increases `D [C]` (TLlib);
  uniform when every channel's increase is the same."""
  d = np.asarray(increases, np.float64)
  spread = d.std()
  z = (d - d.mean()) / spread if spread > 0 else np.zeros_like(d)
  e = np.exp(z / temperature - np.max(z / temperature))
  return (e / e.sum()).astype(np.float32)


def channel_attention(losses_fn, network, batches, channels, *, temperature, chunk=32):
  """DELTA's channel attention from per-example losses.

  Args:
    losses_fn: `(network, batch, scale) -> [B]` per-example losses (0 where
      `batch["mask"]` is 0), where `scale` is `{map: [C]}` channel multipliers (all
      ones: the plain network); traceable. Only the part of the network after a scaled
      map is recomputed per channel (vmap leaves the rest unbatched).
    network: the pytree of arrays `losses_fn` computes with (its weights), passed to
      the compiled program as arguments: closed over, a ResNet-50's weights would be
      constants folded into the program (slower to compile, ~100 MB larger).
    batches: the batches to average over (each must hold a real example).
    channels: `{map: C}`.
    temperature: of the softmax over each map's z-scored increases.
    chunk: channels evaluated at once (vmapped).

  Returns:
    `({map: W [C]}, {map: D [C]})`: the weights and the loss increases, D the mean
    over the batches of each batch's mean increase (TLlib's running average).
  """
  ones = {name: jnp.ones((c,), jnp.float32) for name, c in channels.items()}

  @functools.partial(jax.jit, static_argnums=2)
  def increases(network, batch, name, start):  # (per-channel sums over the batch, examples)
    def total(keep):  # the batch's summed loss with the map's channels scaled by keep
      return jnp.sum(losses_fn(network, batch, dict(ones, **{name: keep})))
    indices = jnp.minimum(start + jnp.arange(chunk), channels[name] - 1)
    # Row 0 keeps every channel: the plain network, computed in the same vmapped
    # program as the zeroed ones, so that their difference carries no rounding of
    # two differently compiled forward passes.
    keep = jnp.concatenate([ones[name][None], 1.0 - jax.nn.one_hot(
        indices, channels[name], dtype=jnp.float32)])  # [1 + chunk, C]
    sums = jax.vmap(total)(keep)
    return sums[1:] - sums[0], jnp.sum(batch["mask"])

  sums = {name: np.zeros(c, np.float64) for name, c in channels.items()}
  count = 0
  for batch in batches:
    for name, c in channels.items():
      for start in range(0, c, chunk):
        values, n = jax.device_get(increases(network, batch, name, start))
        if not n:
          raise ValueError("DELTA's channel attention got a batch without examples")
        sums[name][start:start + chunk] += (
            np.asarray(values, np.float64)[:min(chunk, c - start)] / float(n))
    count += 1
  if not count:
    raise ValueError("DELTA's channel attention needs at least one training batch")
  mean = {name: s / count for name, s in sums.items()}
  return {name: attention_weights(d, temperature=temperature)
          for name, d in mean.items()}, mean


def attention_losses_fn(model):
  """`((variables, kernel, bias), batch, scale) -> [B]`: the masked cross-entropies of
  the classifier `features @ kernel + bias` on `model` (eval mode, its `variables`)
  with the maps' channels scaled; `channel_attention`'s `losses_fn`."""
  def losses_fn(network, batch, scale):
    variables, kernel, bias = network
    out = model.apply(variables, batch["image"], train=False, channel_scale=scale)
    logits = out["features"].astype(jnp.float32) @ kernel + bias
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None],
                                axis=1)[:, 0] * batch["mask"]
  return losses_fn


def attention_batches(split, *, num_batches, batch_size, seed):
  """`num_batches` batches of `batch_size` training images drawn without replacement
  (seeded; fewer when the split is smaller), as TLlib's shuffled loader gives them."""
  rows = np.random.default_rng([seed, 1]).permutation(len(split))[
      :num_batches * batch_size]
  sample = split.take(rows)
  subset = pipeline.Split(images=sample["image_u8"], hw=sample["hw"],
                          labels=sample["label"], size=split.size)
  return subset.batches(batch_size)


# --------------------------------------------------------------------------- method
def stage_channels(model, sample_images, feature_maps):
  """`{map: C}` of the maps DELTA regularises (`regularised_maps`)."""
  out, _ = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x, stages=True),
      sample_images)
  return {name: int(v.shape[-1])
          for name, v in regularised_maps(out["stages"], feature_maps).items()}


def init_extras(keys, params, batch_stats, *, model, config, data):
  """Placeholders of the right shapes: `prepare` puts w* and W in before training."""
  del keys
  sample = jnp.zeros((1,) + tuple(data.image_shape), jnp.float32)
  channels = stage_channels(model, sample, config.delta.feature_maps)
  return {"w0": jax.tree.map(jnp.copy, params["backbone"]),
          "w0_stats": jax.tree.map(jnp.copy, batch_stats["backbone"]),
          "attention": {n: jnp.full((c,), 1.0 / c, jnp.float32)
                        for n, c in channels.items()}}


def prepare(state, *, model, config, data, mesh, workdir, pretrained):
  """w* (the loaded backbone) and the channel attention, before the first step."""
  del workdir, pretrained
  cfg = config.delta
  sharding.check_batch_size(cfg.attention_batch_size, mesh)
  features, labels = common.eval_outputs(model, state, data.train, output="features",
                                         batch_size=config.eval_batch_size, mesh=mesh)
  kernel = relationship.fit_logistic_regression(
      np.concatenate([features, np.ones((len(features), 1), features.dtype)], 1),
      labels, num_classes=config.num_classes, l2=cfg.attention_l2)
  network = ({"params": state.params, "batch_stats": state.batch_stats},
             jnp.asarray(kernel[:-1]), jnp.asarray(kernel[-1]))
  sample = jnp.zeros((1,) + tuple(data.image_shape), jnp.float32)
  channels = stage_channels(model, sample, cfg.feature_maps)
  batches = [sharding.global_batch(b, mesh) for b in attention_batches(
      data.train, num_batches=cfg.attention_batches,
      batch_size=cfg.attention_batch_size, seed=config.seed)]
  weights, _ = channel_attention(attention_losses_fn(model), network, batches, channels,
                                 temperature=cfg.attention_temperature)
  log.info("DELTA attention (%s) from %d batches of %d training images: %s",
           cfg.feature_maps, len(batches), cfg.attention_batch_size, ", ".join(
               f"{n} max {w.max() * len(w):.2f}x uniform" for n, w in weights.items()))
  return state.replace(extras=dict(
      base.starting_point(state),
      attention={n: jnp.asarray(w) for n, w in weights.items()}))


def loss(params, state, batch, context, *, model, cfg):
  """CE + DELTA's penalty. `batch`: image [B, H, W, 3], label [B]."""
  del context
  extras = state.extras
  reference_params = dict(state.params, backbone=extras["w0"])
  reference_stats = dict(state.batch_stats, backbone=extras["w0_stats"])
  reference = model.apply({"params": reference_params, "batch_stats": reference_stats},
                          batch["image"], train=False, stages=True)["stages"]
  variables = {"params": params, "batch_stats": state.batch_stats}
  out, updated = model.apply(variables, batch["image"], train=True, stages=True,
                             mutable=["batch_stats"],
                             rngs={"dropout": common.dropout_rng(state)})
  ce = losses.cross_entropy_loss(logits=out["logits"], labels=batch["label"])
  fm = feature_map_penalty(out["stages"], reference, extras["attention"])
  l2 = head_penalty(params["head"])
  metrics = {"ce": ce, "feature_map_distance": fm, "head_sq_norm": l2,
             "train_accuracy": common.accuracy(out["logits"], batch["label"])}
  return (ce + cfg.alpha * fm + 0.5 * cfg.beta * l2,
          (updated["batch_stats"], metrics, None))


def step_config(config):
  base.warn_weight_decay(config, "DELTA's penalty")
  return StepConfig(alpha=config.delta.alpha, beta=config.delta.beta)


def validate(config):
  if models.is_vit(config.arch) and config.delta.feature_maps != "stage_output":
    raise ValueError(f"{config.arch} is a ViT: its DELTA maps are the block outputs at "
                     "the end of each quarter of its depth, delta.feature_maps="
                     "'stage_output' (it has no convs to take 'last_conv' of)")


METHOD = base.Method(
    name="delta", sections=("delta",),
    rules={"delta.alpha": base.NON_NEGATIVE, "delta.beta": base.NON_NEGATIVE,
           "delta.attention_temperature": base.POSITIVE,
           "delta.attention_l2": base.POSITIVE, "delta.attention_batches": base.COUNT,
           "delta.attention_batch_size": base.COUNT,
           "delta.feature_maps": ("'last_conv' or 'stage_output'",
                                  lambda v: v in FEATURE_MAPS)},
    legacy={"delta.feature_maps": "stage_output"}, validate=validate,
    init_extras=init_extras, prepare=prepare, step_config=step_config, loss=loss)
