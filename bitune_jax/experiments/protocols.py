"""The papers' evaluation protocols on a run's checkpoint (bitune-eval, the sweep).

The classifier's test top-1 and mean per-class accuracy, and, on the backbone's pooled
features (eval mode), top-5 retrieval accuracy (test images against the training set,
cosine similarity), k-means BCubed precision on the training features and a linear
probe; and the unsupervised fine-tuning paper's k-shot transfer. Every evaluation runs
what it was asked to run and keeps its own record in `DIR/evals/`, named by what was
evaluated: `{which}-step{S}.json`, and `{which}-step{S}-kshot{k}-steps{N}-seed{s}.json`
for each k-shot transfer (trained afresh in `DIR/kshot/` each time).
"""

import json
import logging
import os
import shutil

import jax
import ml_collections

from bitune_jax import files, methods, models
from bitune_jax.experiments import plots
from bitune_jax.training import config_base
from bitune_jax.training import evaluation, export, loop, records

log = logging.getLogger("bitune_jax")


def _write_record(workdir, name, record):
  path = os.path.join(workdir, "evals", f"{name}.json")
  files.write_once(path, json.dumps(record, indent=2))  # process 0, whole
  return path


def evaluate_workdir(workdir, *, which="latest", tsne=False):
  """The protocols on the `which` checkpoint; recorded in `evals/{which}-step{S}.json`.
  `tsne`: also a t-SNE of the test features, `plots/tsne-{which}-step{S}.png`."""
  config = records.load_config(workdir)
  run, state, mesh = loop.restore(workdir, config, which)
  if which == "best":  # named by how it was chosen
    which = ("best-on-validation" if config.data.val_fraction > 0
             else "best-on-test")
  metrics = {"step": int(state.step), "checkpoint": which}
  log.info("evaluating %s's %s checkpoint, step %d", workdir, which, metrics["step"])
  if run.method.evaluation == "classifier":  # a classifier to evaluate
    metrics.update(evaluation.run_eval(run, state, config, mesh))
    log.info("test top-1 %.4f, mean per-class accuracy %.4f", metrics["top1"],
             metrics["mean_class_acc"])
  log.info("feature protocols: top-5 retrieval, k-means BCubed, a linear probe")
  metrics.update(evaluation.feature_eval(run, state, config, mesh))
  if tsne:
    log.info("t-SNE of the test features (a minute or two on a CPU)")
    features, labels = evaluation.extract_features(
        run, state, run.data.test, batch_size=config.eval_batch_size, mesh=mesh)
    path = os.path.join(workdir, "plots", f"tsne-{which}-step{metrics['step']}.png")
    if jax.process_index() == 0:
      plots.tsne(features, labels, path, seed=config.seed,
                 class_names=list(run.data.class_names) or None,
                 title=f"{config.method} on {config.dataset}: test features, step "
                       f"{metrics['step']}")
    metrics["tsne"] = path
  _write_record(workdir, f"{which}-step{metrics['step']}", metrics)
  return metrics


def kshot_transfer(workdir, *, shots=(1, 2, 4, 8), total_steps=100, seed=0,
                   which="latest"):
  """The unsupervised fine-tuning paper's k-shot protocol: the run's backbone (its
  `which` checkpoint), exported like a converted checkpoint, fine-tuned (vanilla CE,
  new head) with k labelled images per class; test top-1 for each k. Each k trains
  afresh (an earlier k-shot run of the same name is replaced) and is recorded in
  `evals/{which}-step{S}-kshot{k}-steps{N}-seed{seed}.json`."""
  if not shots or any(int(k) != k or k < 1 for k in shots):
    raise ValueError(f"k-shot values must be positive integers, got {list(shots)}")
  if total_steps < 1:
    raise ValueError(f"kshot_steps must be >= 1, got {total_steps}")
  config = records.load_config(workdir)
  _, state, _ = loop.restore(workdir, config, which)
  step = int(state.step)
  folder = os.path.join(workdir, "kshot", f"{which}-step{step}")
  os.makedirs(folder, exist_ok=True)
  backbone = os.path.join(folder, "backbone.npz")
  if jax.process_index() == 0:  # one writer; the others wait below, then read it
    export.save_model(backbone, state, arch=config.arch, kind=config.method,
                      notes=[f"{workdir} {which} step {step}"])
  results = {}
  for i, k in enumerate(shots, 1):
    log.info("k-shot transfer %d/%d: k = %d, %d steps", i, len(shots), k, total_steps)
    # Vanilla fine-tuning's config: the run's, without its method's sections.
    run = ml_collections.ConfigDict(config_base.stored(
        dict(json.loads(config.to_json()), method=methods.VANILLA)))
    run.init_from, run.seed = backbone, seed
    run.total_steps, run.data.kshot = total_steps, k
    run.eval_every = run.checkpoint_every = total_steps
    run.log_every = min(run.log_every, total_steps)
    # The reference's group rates (a ViT's: the recipe's, its layer-wise decay kept);
    # the head always trains (unsupervised fine-tuning's run had it at 0).
    run.lr_mult.update({"backbone": 1.0, "head": 1.0, "projector": 1.0, "source_head": 1.0}
                       if models.is_vit(run.arch) else
                       {"backbone": 0.1, "head": 1.0, "projector": 0.1, "source_head": 0.1})
    name = f"k{k}-steps{total_steps}-seed{seed}"
    run_dir = os.path.join(folder, name)
    if os.path.exists(run_dir) and jax.process_index() == 0:
      shutil.rmtree(run_dir)  # run what was asked, not an earlier run's result
    files.sync(f"k-shot {name} ready")  # the backbone written, the old run removed
    _, summary = loop.train_and_evaluate(run, run_dir)
    results[f"kshot_{k}_top1"] = summary["top1"]
    log.info("k-shot transfer, k = %d: test top-1 %.4f", k, summary["top1"])
    _write_record(workdir, f"{which}-step{step}-kshot{k}-steps{total_steps}-seed{seed}",
                  {"step": step, "checkpoint": which, "k": k, "kshot_steps": total_steps,
                   "seed": seed, "top1": summary["top1"], "run": run_dir})
  return results
