"""Co-Tuning (You et al., NeurIPS 2020): keep training the pre-trained (source) head on
soft targets R[y_t] = p(y_s | y_t), beside a new target head.

Loss: `CE(target_logits, y_t) + trade_off * soft_CE(source_logits, R[y_t])`
(`losses.co_tuning_loss`; trade_off 2.3 in the reference). R `[C_t, C_s]` is computed
once before training, from the source model's eval-mode outputs on the training set
(no augmentation): `direct` (mean source distribution per target class) or `reverse`
(logistic regression p(y_t | y_s) on a held-out split, calibrated, then Bayes' rule;
`bitune_jax.relationship`). It lives in the train state (checkpoints carry it) and is
cached under `workdir/relationship/`, keyed by checkpoint, split and transforms; a
cached or given relationship computed from another checkpoint is refused.
"""

import dataclasses
import hashlib
import io
import json
import logging

import jax.numpy as jnp
import numpy as np
from etils import epath

from bitune_jax import files, losses, relationship
from bitune_jax.data import splits
from bitune_jax.methods import base, common

log = logging.getLogger("bitune_jax")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  trade_off: float


def build_model(config, num_classes):
  return common.build_network(config, num_classes,
                              source_classes=config.cotuning.source_classes)


def validate(config):
  if config.cotuning.relationship not in ("direct", "reverse"):
    raise ValueError(f"cotuning.relationship must be 'direct' or 'reverse', got "
                     f"{config.cotuning.relationship!r}")


def check_pretrained(pretrained, config):
  """Co-Tuning needs the pre-trained classifier of the backbone's own checkpoint."""
  if pretrained is None or "source_head" not in pretrained:
    what = "no init_from" if pretrained is None else f"{pretrained['path']} has none"
    raise ValueError("Co-Tuning needs a checkpoint with a source head (a supervised "
                     f"classifier, e.g. torchvision's fc): {what}")
  classes = pretrained["source_head"]["kernel"].shape[1]
  if classes != config.cotuning.source_classes:
    raise ValueError(f"the checkpoint's source head has {classes} classes but "
                     f"cotuning.source_classes={config.cotuning.source_classes}")


def init_extras(keys, params, batch_stats, *, model, config, data):
  """A uniform relationship of the right shape: `prepare` computes the real one."""
  del keys, params, batch_stats, config, data
  return {"relationship": jnp.full((model.num_classes, model.source_classes),
                                   1.0 / model.source_classes)}


# --------------------------------------------------------------------------- relationship
def source_logits(state, model, split, *, batch_size, mesh):
  """Eval-mode source-head logits `[N, C_s]` of a split, and its labels `[N]`."""
  return common.eval_outputs(model, state, split, output="source_logits",
                             batch_size=batch_size, mesh=mesh)


def compute_relationship(logits, labels, *, num_classes, cfg, seed):
  """R `[C_t, C_s]` from source logits of the training set, per `cfg` (mode, ...)."""
  probs = relationship.probs_from_logits(logits, temperature=cfg.source_temperature)
  if cfg.relationship == "direct":
    return relationship.direct_relationship(source_probs=probs, labels=labels,
                                            num_classes=num_classes), {}
  if cfg.relationship == "reverse":
    train, val = splits.holdout_split(labels, fraction=cfg.holdout_fraction, seed=seed)
    return relationship.reverse_relationship(
        train_probs=probs[train], train_labels=labels[train], val_probs=probs[val],
        val_labels=labels[val], num_classes=num_classes, calibrate=cfg.calibrate)
  raise ValueError(f"cotuning.relationship must be 'direct' or 'reverse', got "
                   f"{cfg.relationship!r}")


def _cache_key(config, checkpoint_sha):
  what = {"checkpoint": checkpoint_sha, "dataset": config.dataset,
          "part": config.data.get("part", ""), "rate": config.sampling_rate,
          "seed": config.seed, "image_size": config.image_size,
          "cotuning": config.cotuning.to_dict()}
  return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _load(path, checkpoint_sha):
  with np.load(path, allow_pickle=False) as f:
    meta = json.loads(bytes(f["meta"]).decode())
    matrix = f["relationship"]
  if meta["checkpoint_sha256"] != checkpoint_sha:
    raise ValueError(f"relationship {path} was computed from checkpoint "
                     f"{meta['checkpoint_sha256'][:12]}, but this run starts from "
                     f"{checkpoint_sha[:12]}: refusing it")
  return matrix


def prepare(state, *, model, config, data, mesh, workdir, pretrained):
  """Computes (or loads from the cache) R and puts it into `state.extras`."""
  sha = pretrained["sha256"]
  given = config.cotuning.relationship_file
  path = (epath.Path(given) if given else
          epath.Path(workdir or ".") / "relationship" / f"{_cache_key(config, sha)}.npz")
  files.sync("relationship cache looked up")  # every process sees the same files
  if path.exists():
    matrix = _load(path, sha)
    log.info("Co-Tuning relationship loaded from %s", path)
  elif given:
    raise ValueError(f"cotuning.relationship_file {given} does not exist")
  else:
    logits, labels = source_logits(state, model, data.train,
                                   batch_size=config.eval_batch_size, mesh=mesh)
    matrix, info = compute_relationship(logits, labels,
                                        num_classes=config.num_classes,
                                        cfg=config.cotuning, seed=config.seed)
    log.info("Co-Tuning %s relationship from %d images %s", config.cotuning.relationship,
             len(logits), {k: v for k, v in info.items() if np.ndim(v) == 0})
    if workdir is not None:  # every process computed the same R; process 0 keeps it
      meta = json.dumps({"checkpoint_sha256": sha, "checkpoint": pretrained["path"]})
      buffer = io.BytesIO()
      np.savez(buffer, relationship=matrix, meta=np.frombuffer(meta.encode(), np.uint8))
      files.write_once(path, buffer.getvalue())
  expected = (config.num_classes, config.cotuning.source_classes)
  if matrix.shape != expected:
    raise ValueError(f"relationship {path} has shape {matrix.shape}, expected {expected}")
  return state.replace(extras={"relationship": jnp.asarray(matrix, jnp.float32)})


# --------------------------------------------------------------------------- step
def loss(params, state, batch, context, *, model, cfg):
  """CE + trade_off * the source head's soft CE against R[y]. `batch`: image
  [B, H, W, 3], label [B]."""
  del context
  labels = batch["label"]
  targets = state.extras["relationship"][labels]  # [B, C_s]
  out, batch_stats = common.forward(model, params, state.batch_stats, batch["image"],
                                    train=True, rng=common.dropout_rng(state))
  ce = common.ce_loss(out, labels)
  co = losses.co_tuning_loss(source_logits=out["source_logits"],
                             relationship_targets=targets)
  return ce + cfg.trade_off * co, (batch_stats, {
      "ce": ce, "co_tuning": co,
      "train_accuracy": common.accuracy(out["logits"], labels)}, None)


METHOD = base.Method(
    name="cotuning", sections=("cotuning",),
    rules={"cotuning.trade_off": base.NON_NEGATIVE,
           "cotuning.source_temperature": base.POSITIVE,
           "cotuning.holdout_fraction": base.FRACTION},
    validate=validate, keeps=("backbone", "source_head"),
    check_pretrained=check_pretrained, build_model=build_model,
    init_extras=init_extras, prepare=prepare, loss=loss,
    step_config=lambda config: StepConfig(trade_off=config.cotuning.trade_off))
