"""The shape of a method: one `Method` record, and the one train step every method runs.

A method module ends with `METHOD = Method(...)`, declaring what the loop, the data and
the evaluation read of it. Everything has a default (vanilla fine-tuning's), so a
method states only what differs. The step is always

  before -> forward + loss -> gradient -> optimizer update -> step + 1 -> after

where `before` may move the state outside the gradient (the EMA key encoder, keys
enqueued ahead of the loss), `loss` is differentiated with respect to the parameters,
and `after` updates what follows the optimizer (queues, memory banks, class centers).
"""

import dataclasses
import functools
import logging
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from bitune_jax.data import spec
from bitune_jax.methods import common

log = logging.getLogger("bitune_jax")

# A rule of a config field: (what it must be, in words; the test of a value).
Rule = tuple[str, Callable[[Any], bool]]

POSITIVE: Rule = ("> 0", lambda v: v > 0)
NON_NEGATIVE: Rule = (">= 0", lambda v: v >= 0)
COUNT: Rule = ("an integer >= 1", lambda v: int(v) == v and v >= 1)
EMA: Rule = ("in [0, 1]", lambda v: 0 <= v <= 1)
FRACTION: Rule = ("in (0, 1)", lambda v: 0 < v < 1)


def _no_check(config):
  del config


def _no_pretrained_check(pretrained, config):
  del pretrained, config


def plain_network(config, num_classes):
  return common.build_network(config, num_classes)


def no_extras(keys, params, batch_stats, *, model, config, data):
  del keys, params, batch_stats, model, config, data
  return {}


def replicated_extras(abstract_extras, mesh, config):
  del config
  return common.replicated_shardings(abstract_extras, mesh)


def unprepared(state, *, model, config, data, mesh, workdir, pretrained):
  del model, config, data, mesh, workdir, pretrained
  return state


def no_step_config(config):
  del config


def nothing_before(state, batch, *, model, cfg):
  del batch, model, cfg
  return state, None


def nothing_after(state, batch, context, aux, *, cfg):
  del batch, context, aux, cfg
  return state


def cross_entropy(params, state, batch, context, *, model, cfg):
  """Vanilla fine-tuning's loss: cross-entropy of the classifier on `batch["image"]`."""
  del context, cfg
  out, batch_stats = common.forward(model, params, state.batch_stats, batch["image"],
                                    train=True, rng=common.dropout_rng(state))
  loss = common.ce_loss(out, batch["label"])
  return loss, (batch_stats, {"ce": loss, "train_accuracy": common.accuracy(
      out["logits"], batch["label"])}, None)


@dataclasses.dataclass(frozen=True)
class Method:
  """What a method is, to everything outside `bitune_jax.methods`.

  Attributes:
    name: `config.method`.
    sections: the config sections only this method reads (`configs/<name>.py` builds
      them; a config has its method's sections and no other's).
    rules: `{"section.field": Rule}`: values that cannot train, refused up front.
    legacy: `{"section.field": value}`: fields added after runs were recorded without
      them, with the value that describes how those runs trained.
    moved: `{"section.field": "old_section.field"}`: fields moved into its section,
      and where runs recorded before the move kept them.
    validate: `(config) -> None`, raising ValueError on settings that cannot work
      together (before anything is loaded or compiled).
    views: the training views of a batch: "one" (`image`), "two" (`image_q`,
      `image_k`: two augmentations of each image) or "weak_strong" (FixMatch: `image`
      weak, and an unlabelled batch's `u_weak`, `u_strong`).
    unlabelled: `(config) -> int`, how many images of the target's whole training
      set, unlabelled, each batch holds per labelled one (FixMatch's mu; 0: none).
    replay_fraction: `(config) -> float`, the share of the pool replayed from the
      source dataset (unsupervised fine-tuning).
    evaluation: "classifier" (top-1, mean class accuracy) or "features" (retrieval,
      k-means, linear probe on backbone features: the methods trained without labels).
    keeps: what it takes from the pre-trained checkpoint: the backbone, and
      "source_head" (the pre-trained classifier, Co-Tuning).
    check_pretrained: `(pretrained, config) -> None`, before anything compiles.
    build_model: `(config, num_classes) -> nn.Module` (`common.Network` outputs).
    extra_keys: random keys its extras are drawn from at init (`init_extras`).
    init_extras: `(keys, params, batch_stats, *, model, config, data) -> dict`: the
      state's `extras` at step 0 (queues, banks, centers, placeholders).
    key_encoder: `(config) -> bool`: a momentum key encoder beside the query encoder.
    extras_shardings: `(abstract_extras, mesh, config) -> shardings` (replicated by
      default; Bi-tuning shards its queues by class).
    prepare: `(state, *, model, config, data, mesh, workdir, pretrained) -> state`,
      once before training, not on resume (Co-Tuning's relationship, DELTA's
      attention, the starting point of L2-SP and DELTA).
    step_config: `(config) -> hashable` settings of the step (`cfg` below).
    before: `(state, batch, *, model, cfg) -> (state, context)`, outside the gradient.
    loss: `(params, state, batch, context, *, model, cfg) -> (loss, (batch_stats,
      metrics, aux))`, differentiated with respect to `params`.
    after: `(state, batch, context, aux, *, cfg) -> state`, after the update.
  """
  name: str
  sections: tuple[str, ...] = ()
  rules: Mapping[str, Rule] = dataclasses.field(default_factory=dict)
  legacy: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  moved: Mapping[str, str] = dataclasses.field(default_factory=dict)
  validate: Callable[[Any], None] = _no_check
  views: str = "one"
  unlabelled: Callable[[Any], int] = lambda config: 0
  replay_fraction: Callable[[Any], float] = lambda config: 0.0
  evaluation: str = "classifier"
  keeps: tuple[str, ...] = ("backbone",)
  check_pretrained: Callable[[Optional[dict], Any], None] = _no_pretrained_check
  build_model: Callable[[Any, int], Any] = plain_network
  extra_keys: int = 0
  init_extras: Callable[..., dict] = no_extras
  key_encoder: Callable[[Any], bool] = lambda config: False
  extras_shardings: Callable[..., Any] = replicated_extras
  prepare: Callable[..., Any] = unprepared
  step_config: Callable[[Any], Any] = no_step_config
  before: Callable[..., Any] = nothing_before
  loss: Callable[..., Any] = cross_entropy
  after: Callable[..., Any] = nothing_after

  def __post_init__(self):
    if self.views not in spec.VIEWS:
      raise ValueError(f"{self.name}: views must be one of {', '.join(spec.VIEWS)}, got "
                       f"{self.views!r}")
    if self.evaluation not in ("classifier", "features"):
      raise ValueError(f"{self.name}: evaluation must be 'classifier' or 'features', "
                       f"got {self.evaluation!r}")


  def needs(self, config) -> spec.Needs:
    """What it asks of the data under `config` (`bitune_jax.data.spec.Needs`)."""
    return spec.Needs(views=self.views, unlabelled=int(self.unlabelled(config)),
                      replay_fraction=float(self.replay_fraction(config)))


# --------------------------------------------------------------------------- state
def init_state(method, rng, sample_images, *, model, tx, config, data):
  """The state at step 0: the network's variables drawn from `rng`, the method's extras
  from `method.extra_keys` more keys of the same split, the key encoder (if any) a copy
  of the query encoder."""
  rng, init_rng, *extra = jax.random.split(rng, 2 + method.extra_keys)
  params, batch_stats = common.init_variables(model, init_rng, sample_images)
  extras = method.init_extras(tuple(extra), params, batch_stats, model=model,
                              config=config, data=data)
  return common.new_state(rng, params, batch_stats, tx,
                          key_encoder=method.key_encoder(config), extras=extras)


def state_shardings(method, abstract_state, mesh, config):
  """Everything replicated but the extras, which the method shards as it says."""
  shardings = common.replicated_shardings(abstract_state, mesh)
  return shardings.replace(extras=method.extras_shardings(abstract_state.extras, mesh,
                                                          config))


# --------------------------------------------------------------------------- step
def train_step(state, batch, *, method, model, tx, cfg):
  """One step of any method (the module docstring): `(state, metrics)`; the metrics
  hold the method's and `loss`."""
  state, context = method.before(state, batch, model=model, cfg=cfg)

  def loss_fn(params):
    return method.loss(params, state, batch, context, model=model, cfg=cfg)

  (loss, (batch_stats, metrics, aux)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  params, opt_state = common.apply_gradients(state, grads, tx)
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state)
  return method.after(state, batch, context, aux, cfg=cfg), dict(metrics, loss=loss)


def make_train_step(method, model, tx, config):
  """`train_step(state, batch) -> (state, metrics)` of `method` under `config`."""
  return functools.partial(train_step, method=method, model=model, tx=tx,
                           cfg=method.step_config(config))


def with_views(step_fn, views):
  """`step(state, batch)` whose batch holds the uint8 cache images: the step's training
  views are made on the device first (`views(batch, step)`, the data's `Input.views`,
  keyed by the step being taken), then `step_fn` runs on them."""
  def step(state, batch):
    return step_fn(state, views(batch, state.step))
  return step


def warn_weight_decay(config, penalty):
  """For the methods whose penalty replaces weight decay (their configs set 0): an
  override that decays too is allowed, and said."""
  if config.weight_decay:
    log.warning("%s with weight_decay=%g: the optimizer also decays every group towards "
                "0, on top of %s (configs/%s.py sets 0)", config.method,
                config.weight_decay, penalty, config.method)


def starting_point(state):
  """The backbone as it is now (its parameters and BatchNorm statistics): the
  pre-trained w0 that L2-SP and DELTA measure the distance from, taken in `prepare`."""
  return {"w0": jax.tree.map(jnp.copy, state.params["backbone"]),
          "w0_stats": jax.tree.map(jnp.copy, state.batch_stats["backbone"])}
