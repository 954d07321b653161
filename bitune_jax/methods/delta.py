"""DELTA (Li et al., ICLR 2019): fine-tuning with the feature maps of the backbone's
stages held near the pre-trained network's, each channel weighted by its attention.

Loss: `CE + alpha * sum_s sum_c W_sc * mean_b ||FM_sc(w, x_b) - FM_sc(w*, x_b)||^2 +
beta / 2 * ||w_new||^2`, where FM_sc is channel c of the output of backbone stage s
(`layer1`..`layer4` of a ResNet, `denseblock1`..`denseblock4` of a DenseNet; the
squared norm sums over the map's positions), w* the pre-trained backbone, frozen, run
in eval mode on the same images, and w_new the new classifier head (kernel and bias).

Channel attention W (DELTA's supervised attention), computed once before training on
the training set with the pre-trained network (`prepare`):
1. a classifier for the target classes is fitted on the frozen pooled features of the
   training images (multinomial logistic regression, L2 `attention_l2`);
2. for each stage s and channel c, the increase of its mean cross-entropy when that
   channel of the stage's output is zeroed and the rest of the network runs on it:
   `D_sc = mean_i [CE_i(channel c of s zeroed) - CE_i]`, over the first
   `attention_batches` training batches;
3. `W_s = softmax(D_s / attention_temperature)` over the channels of each stage (a
   channel the classifier depends on more is held closer to the pre-trained map).

The penalty replaces weight decay (`configs/delta.py` sets 0), as in L2-SP. A resumed
run keeps the w* and W of its checkpoint.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from bitune_jax import losses, relationship, sharding
from bitune_jax.methods import common

log = logging.getLogger("bitune_jax")
TWO_VIEWS = False


@dataclasses.dataclass(frozen=True)
class StepConfig:
  alpha: float  # weight of the attention-weighted feature-map distance
  beta: float  # weight of ||w_new||^2 / 2


# --------------------------------------------------------------------------- penalty
def feature_map_penalty(stages, reference, attention):
  """`sum_s sum_c W_sc * mean_b sum_{h,w} (FM - FM*)^2_{b,h,w,c}` in float32.

  Args:
    stages: `{stage: [B, H, W, C]}` feature maps of the network being trained.
    reference: the same of the pre-trained network (no gradient is taken through it).
    attention: `{stage: [C]}` channel weights.
  """
  total = jnp.zeros((), jnp.float32)
  for name, weights in attention.items():
    diff = stages[name].astype(jnp.float32) - jax.lax.stop_gradient(
        reference[name].astype(jnp.float32))
    per_channel = jnp.mean(jnp.sum(jnp.square(diff), axis=(1, 2)), axis=0)  # [C]
    total = total + jnp.sum(weights * per_channel)
  return total


def head_penalty(head):
  """`||w_new||^2` (kernel and bias) in float32."""
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(head)),
             jnp.zeros((), jnp.float32))


# --------------------------------------------------------------------------- attention
def channel_attention(losses_fn, batches, channels, *, temperature, chunk=32):
  """DELTA's channel attention from per-example losses.

  Args:
    losses_fn: `(batch, scale) -> [B]` per-example losses (0 where `batch["mask"]` is
      0), where `scale` is `{stage: [C]}` channel multipliers (all ones: the plain
      network); traceable.
    batches: the batches to average over.
    channels: `{stage: C}`.
    temperature: the softmax's.
    chunk: channels evaluated at once (vmapped).

  Returns:
    `({stage: W [C]}, {stage: D [C]})`: the softmax weights and the mean loss
    increases.
  """
  ones = {name: jnp.ones((c,), jnp.float32) for name, c in channels.items()}

  @functools.partial(jax.jit, static_argnums=1)
  def increases(batch, name, start):  # (per-channel sums over the batch, examples)
    base = losses_fn(batch, ones)  # [B]

    def zeroed(index):
      scale = dict(ones)
      scale[name] = ones[name].at[index].set(0.0)
      return jnp.sum(losses_fn(batch, scale) - base)
    indices = jnp.minimum(start + jnp.arange(chunk), channels[name] - 1)
    return jax.vmap(zeroed)(indices), jnp.sum(batch["mask"])

  sums = {name: np.zeros(c, np.float64) for name, c in channels.items()}
  count = 0
  for batch in batches:
    for name, c in channels.items():
      for start in range(0, c, chunk):
        values, n = increases(batch, name, start)
        values = np.asarray(jax.device_get(values), np.float64)
        sums[name][start:start + chunk] += values[:min(chunk, c - start)]
    count += int(n)
  if not count:
    raise ValueError("DELTA's channel attention needs at least one training batch")
  mean = {name: s / count for name, s in sums.items()}
  weights = {}
  for name, d in mean.items():
    z = d / temperature
    e = np.exp(z - z.max())
    weights[name] = (e / e.sum()).astype(np.float32)
  return weights, mean


# --------------------------------------------------------------------------- method
def build_model(config, num_classes):
  return common.build_network(config, num_classes)


def stage_channels(model, sample_images):
  """`{stage: C}` of the model's backbone stages."""
  out, _ = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x, stages=True),
      sample_images)
  return {name: int(v.shape[-1]) for name, v in out["stages"].items()}


def init_state(rng, sample_images, *, model, tx, config):
  del config
  rng, init_rng = jax.random.split(rng)
  params, batch_stats = common.init_variables(model, init_rng, sample_images)
  channels = stage_channels(model, sample_images)
  # Placeholders of the right shapes: `prepare` puts w* and W in before training.
  extras = {"w0": jax.tree.map(jnp.copy, params["backbone"]),
            "w0_stats": jax.tree.map(jnp.copy, batch_stats["backbone"]),
            "attention": {n: jnp.full((c,), 1.0 / c, jnp.float32)
                          for n, c in channels.items()}}
  return common.new_state(rng, params, batch_stats, tx, extras=extras)


def state_shardings(abstract_state, mesh, config):
  del config
  return common.replicated_shardings(abstract_state, mesh)


def prepare(state, *, model, config, data, mesh, workdir, pretrained):
  """w* (the loaded backbone) and the channel attention, before the first step."""
  del workdir, pretrained
  cfg = config.delta
  features, labels = common.eval_outputs(model, state, data.train, output="features",
                                         batch_size=config.eval_batch_size, mesh=mesh)
  kernel = relationship.fit_logistic_regression(
      np.concatenate([features, np.ones((len(features), 1), features.dtype)], 1),
      labels, num_classes=config.num_classes, l2=cfg.attention_l2)
  kernel, bias = jnp.asarray(kernel[:-1]), jnp.asarray(kernel[-1])
  params = {"params": state.params, "batch_stats": state.batch_stats}

  def losses_fn(batch, scale):
    out = model.apply(params, batch["image"], train=False, channel_scale=scale)
    logits = out["features"] @ kernel + bias
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None],
                                axis=1)[:, 0] * batch["mask"]

  sample = jnp.zeros((1,) + tuple(data.image_shape), jnp.float32)
  channels = stage_channels(model, sample)
  batches = []
  for batch in data.train.batches(config.eval_batch_size):
    if len(batches) == cfg.attention_batches:
      break
    batches.append(sharding.global_batch(batch, mesh))
  weights, _ = channel_attention(losses_fn, batches, channels,
                                 temperature=cfg.attention_temperature)
  log.info("DELTA attention from %d training batches: %s", len(batches), ", ".join(
      f"{n} max {w.max() * len(w):.2f}x uniform" for n, w in weights.items()))
  extras = {"w0": jax.tree.map(jnp.copy, state.params["backbone"]),
            "w0_stats": jax.tree.map(jnp.copy, state.batch_stats["backbone"]),
            "attention": {n: jnp.asarray(w) for n, w in weights.items()}}
  return state.replace(extras=extras)


def train_step(state, batch, *, model, tx, cfg):
  """CE + DELTA's penalty. `batch`: image [B, H, W, 3], label [B]."""
  extras = state.extras
  reference_params = dict(state.params, backbone=extras["w0"])
  reference_stats = dict(state.batch_stats, backbone=extras["w0_stats"])
  reference = model.apply({"params": reference_params, "batch_stats": reference_stats},
                          batch["image"], train=False, stages=True)["stages"]

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    out, updated = model.apply(variables, batch["image"], train=True, stages=True,
                               mutable=["batch_stats"])
    ce = losses.cross_entropy_loss(logits=out["logits"], labels=batch["label"])
    fm = feature_map_penalty(out["stages"], reference, extras["attention"])
    l2 = head_penalty(params["head"])
    metrics = {"ce": ce, "feature_map_distance": fm, "head_sq_norm": l2,
               "train_accuracy": common.accuracy(out["logits"], batch["label"])}
    return ce + cfg.alpha * fm + 0.5 * cfg.beta * l2, (updated["batch_stats"], metrics)

  return common.optimizer_step(state, loss_fn, tx)


def make_train_step(model, tx, config):
  if config.weight_decay:
    log.warning("delta with weight_decay=%g: the optimizer also decays every group "
                "towards 0, on top of DELTA's penalty (configs/delta.py sets 0)",
                config.weight_decay)
  cfg = StepConfig(alpha=config.delta.alpha, beta=config.delta.beta)
  return functools.partial(train_step, model=model, tx=tx, cfg=cfg)
