"""The offline demo's source model: supervised pre-training on scikit-learn's digits
0-4 by this pipeline, exported like a converted checkpoint, so that the demo fine-tunes
(on digits 5-9) through the same `init_from` path as a real checkpoint.

A config names it `init_from = "demo:digits_source"` (`configs/*.py:demo`); the entry
points train with `SOURCES`, which make it once per workdir.
"""

import logging
import os

import jax

from bitune_jax import files, models
from bitune_jax.configs import finetune as finetune_config
from bitune_jax.methods import common
from bitune_jax.training import export, loop

log = logging.getLogger("bitune_jax")

NAME = "demo:digits_source"


def source_file(workdir):
  """Where `source_model(config, workdir)` writes the demo's source model."""
  return os.path.join(workdir, "pretrained", "digits_source.npz")


def source_model(config, workdir):
  """The path of the demo's source model for `config`, trained first if `workdir`
  has none yet (under `workdir/pretrain`)."""
  path = source_file(workdir)
  if os.path.exists(path):  # written by process 0 of an earlier start (whole)
    return path
  # One source model whatever fine-tunes it, as a real checkpoint: vanilla
  # fine-tuning's demo config, taking from the run only its arch, image size, seed,
  # the pre-training's length and rate, and how it reports and caches (not, e.g.,
  # unsupervised fine-tuning's MoCo views or FixMatch's k-shot subset).
  pre = finetune_config.get_config("vit_demo" if models.is_vit(config.arch) else "demo")
  with pre.unlocked():
    for field in ("arch", "image_size", "seed", "eval_batch_size", "log_every",
                  "eval_every", "checkpoint_every", "multi_host"):
      pre[field] = config[field]
    for field in ("cache_dir", "threads"):
      pre.data[field] = config.data[field]
    pre.init_from, pre.data.part = "", "source"
    pre.total_steps, pre.lr = config.pretrain.total_steps, config.pretrain.lr
    pre.lr_mult = dict({g: 1.0 for g in common.GROUPS}, layer_decay=1.0)  # from scratch
  log.info("demo: supervised pre-training on digits 0-4 (%d steps)", pre.total_steps)
  state, summary = loop.train_and_evaluate(pre, os.path.join(workdir, "pretrain"))
  log.info("demo: source model test top-1 %.4f", summary["top1"])
  if jax.process_index() == 0:  # one writer; the others wait for it, then read it
    export.save_model(path, state, arch=config.arch, kind="supervised",
                      notes=[f"digits 0-4, {summary}"],
                      parts=(("source_head", ("head", "dense")),),
                      source="digits 0-4 pre-training")
  files.sync("demo source model written")
  return path


SOURCES = {NAME: source_model}


def train_and_evaluate(config, workdir):
  """`training.loop.train_and_evaluate`, with the demo's source model available as
  `init_from = "demo:digits_source"`."""
  return loop.train_and_evaluate(config, workdir, SOURCES)
