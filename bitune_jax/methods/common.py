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
  drop_path: float = 0.0  # a ViT backbone's (`models.vit.ViT.drop_path`)
  head_init: str = "torch"  # the classifier's (`models.heads`); projectors: "torch"

  @nn.compact
  def __call__(self, images, train=False, stages=False, channel_scale=None):
    """`stages`: also `out["stages"]`, the backbone's stage outputs (`layer1`.. for a
    ResNet, `denseblock1`.. for a DenseNet); `channel_scale`: see the backbones."""
    extra = {"drop_path": self.drop_path} if models.is_vit(self.arch) else {}
    backbone = models.create_backbone(self.arch, dtype=self.dtype, name="backbone",
                                      **extra)
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
                 head_init=head_init(config, reference_init), drop_path=config.drop_path)


def init_variables(model, rng, sample_images):
  """`(params, batch_stats)` of a new network; a ViT's `batch_stats` are
  `{"backbone": {}}` (it has no BatchNorm), so that every state has the same shape."""
  variables = model.init(rng, sample_images, train=False)
  return variables["params"], variables.get("batch_stats", {"backbone": {}})


# --------------------------------------------------------------------------- step pieces
def apply_gradients(state, grads, tx):
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return optax.apply_updates(state.params, updates), opt_state


def accuracy(logits, labels):
  return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def forward(model, params, batch_stats, images, *, train, rng=None):
  """`(outputs, new_batch_stats)`; in eval mode the statistics are returned unchanged.
  `rng`: the key of a ViT's drop-path in training (`dropout_rng`); without one nothing
  is dropped (a momentum key encoder's forward)."""
  variables = {"params": params, "batch_stats": batch_stats}
  if not train:
    return model.apply(variables, images, train=False), batch_stats
  out, updated = model.apply(variables, images, train=True, mutable=["batch_stats"],
                             rngs={} if rng is None else {"dropout": rng})
  return out, updated["batch_stats"]


def dropout_rng(state):
  """The drop-path key of the step `state` is about to take: the step's key folded once
  more, apart from what else a method draws from `fold_in(state.rng, state.step)`
  (Bi-tuning's key sampling)."""
  return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)


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
