"""What every method shares: the train state, the network, the optimizer, step pieces.

The state is a pytree of arrays only. Methods with a momentum key encoder keep its
params and BatchNorm statistics beside the query encoder's (`key_params`,
`key_batch_stats`); others leave them empty. Method-specific state (queues, ...) lives
in `extras`.
"""

import dataclasses
import functools
import logging
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from bitune_jax import losses, models, sharding

log = logging.getLogger("bitune_jax")

# Parameter groups: the top-level keys of `params`.
GROUPS = ("backbone", "head", "projector", "source_head")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  rng: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  key_params: Any
  key_batch_stats: Any
  extras: Any


def new_state(rng, params, batch_stats, tx, *, key_encoder=False, extras=None):
  """The state at step 0; with `key_encoder`, the key encoder starts as a copy of the
  query encoder (MoCo-style methods)."""
  return TrainState(step=jnp.zeros((), jnp.int32), rng=rng, params=params,
                    batch_stats=batch_stats, opt_state=tx.init(params),
                    key_params=params if key_encoder else {},
                    key_batch_stats=batch_stats if key_encoder else {},
                    extras={} if extras is None else extras)


def replicated_shardings(abstract_state, mesh):
  """Every leaf of the state replicated over the mesh."""
  return jax.tree.map(lambda _: sharding.replicated(mesh), abstract_state)


class Network(nn.Module):
  """Backbone + classifier head (+ projector, + source head):
  `images -> {features, logits[, projection][, source_logits]}`.

  Variables: `params/{backbone, head, projector, source_head}`, `batch_stats/backbone`.
  """
  arch: str
  num_classes: int
  projector_dim: Optional[int] = None
  projector_hidden: Optional[int] = None
  source_classes: Optional[int] = None  # the pre-trained classifier (Co-Tuning)
  dtype: Any = jnp.float32
  head_init: str = "torch"  # the classifier's (`models.heads`); projectors: "torch"

  @nn.compact
  def __call__(self, images, train=False, stages=False, channel_scale=None):
    """`stages`: also `out["stages"]`, the backbone's stage outputs (`layer1`.. for a
    ResNet, `denseblock1`.. for a DenseNet); `channel_scale`: see the backbones."""
    backbone = models.create_backbone(self.arch, dtype=self.dtype, name="backbone")
    maps = None
    if stages or channel_scale:
      features, maps = backbone(images, train=train, return_stages=True,
                                channel_scale=channel_scale)
    else:
      features = backbone(images, train=train)
    out = {"features": features,
           "logits": models.Classifier(self.num_classes, dtype=self.dtype,
                                       head_init=self.head_init, name="head")(features)}
    if self.projector_dim:
      out["projection"] = models.Projector(self.projector_dim, self.projector_hidden,
                                           dtype=self.dtype, name="projector")(features)
    if self.source_classes:
      out["source_logits"] = nn.Dense(
          self.source_classes, dtype=self.dtype, param_dtype=jnp.float32,
          name="source_head")(features).astype(jnp.float32)
    if stages:
      out["stages"] = {k: v for k, v in maps.items() if k != "stem"}
    return out


def head_init(config, reference="torch"):
  """The classifier's initialisation: `config.head_init`, or where that is empty the
  method's `reference` one (Bi-tuning's "normal_0.01", the others' "torch")."""
  return config.head_init or reference


def build_network(config, num_classes, *, projector_dim=None, source_classes=None,
                  reference_init="torch"):
  """The `Network` of `config` (a projector of width `projector_dim`, if given: the
  method's own field)."""
  dtype = jnp.bfloat16 if config.bf16 else jnp.float32
  return Network(arch=config.arch, num_classes=num_classes, projector_dim=projector_dim,
                 source_classes=source_classes, dtype=dtype,
                 head_init=head_init(config, reference_init))


def init_variables(model, rng, sample_images):
  variables = model.init(rng, sample_images, train=False)
  return variables["params"], variables["batch_stats"]


# --------------------------------------------------------------------------- optimizer
def learning_rate_schedule(config):
  """Base schedule: 'step' (x decay_factor at each fraction in decay_at) or 'cosine'."""
  total = config.total_steps
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(config.lr, decay_steps=max(total, 1))
  if config.schedule == "step":
    boundaries = {int(f * total): config.decay_factor for f in config.decay_at
                  if 0 < int(f * total) < total}
    return optax.piecewise_constant_schedule(config.lr, boundaries)
  raise ValueError(f"schedule must be 'step' or 'cosine', got {config.schedule!r}")


def make_optimizer(config):
  """SGD (nesterov momentum, coupled weight decay as in torch.optim.SGD) with one
  learning-rate multiplier per parameter group (`config.lr_mult.<group>`)."""
  base = learning_rate_schedule(config)

  def group_tx(mult):
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(lambda step: mult * base(step), momentum=config.momentum,
                  nesterov=config.nesterov))
  transforms = {g: group_tx(config.lr_mult.get(g, 1.0)) for g in GROUPS}
  label_fn = lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}  # noqa: E731
  return optax.multi_transform(transforms, label_fn)


def learning_rates(config, groups, step):
  """`{"lr/<group>": rate}`: each group's learning rate at 0-based optimizer step `step`
  (the update that makes train step `step + 1`)."""
  base = float(learning_rate_schedule(config)(step))
  return {f"lr/{g}": config.lr_mult.get(g, 1.0) * base for g in groups}


def log_learning_rates(config, params):
  for group in params:
    mult = config.lr_mult.get(group, 1.0)
    log.info("learning rate of %-11s %.3g (x%g of %.3g; schedule %s)", group,
                 mult * config.lr, mult, config.lr, config.schedule)


# --------------------------------------------------------------------------- step pieces
def apply_gradients(state, grads, tx):
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return optax.apply_updates(state.params, updates), opt_state


def accuracy(logits, labels):
  return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def forward(model, params, batch_stats, images, *, train):
  """`(outputs, new_batch_stats)`; in eval mode the statistics are returned unchanged."""
  variables = {"params": params, "batch_stats": batch_stats}
  if not train:
    return model.apply(variables, images, train=False), batch_stats
  out, updated = model.apply(variables, images, train=True, mutable=["batch_stats"])
  return out, updated["batch_stats"]


def ce_loss(out, labels):
  return losses.cross_entropy_loss(logits=out["logits"], labels=labels)


def eval_outputs(model, state, split, *, output, batch_size, mesh):
  """Eval-mode `out[output]` `[N, ...]` of every example of `split` (a
  `bitune_jax.data.input` split), with the labels `[N]` (padding dropped)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  step = _output_step(model, output, mesh)
  values, labels = [], []
  for batch in split.batches(batch_size):
    out, label, mask = jax.device_get(step(state, sharding.global_batch(batch, mesh)))
    values.append(out[mask > 0])
    labels.append(label[mask > 0])
  return np.concatenate(values), np.concatenate(labels)


@functools.lru_cache(maxsize=16)
def _output_step(model, output, mesh):
  """The jitted eval-mode `(out[output], label, mask)` of a batch, replicated (every
  host sees the batch): one per (model, output, mesh), so that evaluating every N steps
  traces and compiles it once, not at each evaluation."""
  return jax.jit(lambda s, b: (forward(model, s.params, s.batch_stats, b["image"],
                                       train=False)[0][output], b["label"], b["mask"]),
                 out_shardings=sharding.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class EvalStep:
  """Eval-mode predictions of a batch: `(predictions [B], labels [B], mask [B])`."""
  model: nn.Module

  def __call__(self, state, batch):
    out, _ = forward(self.model, state.params, state.batch_stats, batch["image"],
                     train=False)
    return jnp.argmax(out["logits"], -1), batch["label"], batch["mask"]
