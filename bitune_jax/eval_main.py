"""`bitune-eval --workdir DIR [--which latest|best] [--kshot 1,2,4,8]`: the papers'
evaluation protocols on a run's checkpoint.

Rebuilds the run from `DIR/config.json`, restores its checkpoint and reports test top-1
and mean per-class accuracy, and, on the backbone's pooled features (eval mode), top-5
retrieval accuracy (test images against the training set, cosine similarity), k-means
BCubed precision on the training features and a linear probe. Writes `DIR/eval.json`.
"""

import argparse
import json
import os

import jax
import ml_collections

from bitune_jax import checkpoint, convert, sharding, train


def evaluate_workdir(workdir, *, which="latest"):
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no config.json: not a bitune-train workdir")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  mesh = sharding.make_mesh()
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    if ckpts.latest_step() is None:
      raise ValueError(f"no checkpoint in {ckpts.directory}")
    run = train.setup(config, mesh, workdir, ckpts)
    state = run.state
    if which == "best":
      state = ckpts.restore(jax.eval_shape(lambda: state), run.state_shardings, "best")
  finally:
    ckpts.close()
  metrics = {"step": int(state.step), "checkpoint": which}
  if not getattr(run.method, "FEATURE_EVAL", False):  # a classifier to evaluate
    metrics.update(train.run_eval(run, state, config, mesh))
  metrics.update(train.feature_eval(run, state, config, mesh))
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  return metrics


def kshot_transfer(workdir, *, shots=(1, 2, 4, 8), total_steps=100, seed=0):
  """The unsupervised fine-tuning paper's k-shot protocol: the run's backbone (latest
  checkpoint), exported like a converted checkpoint, fine-tuned (vanilla CE, new head)
  with k labelled images per class; test top-1 for each k."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  mesh = sharding.make_mesh()
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    if ckpts.latest_step() is None:
      raise ValueError(f"no checkpoint in {ckpts.directory}")
    state = train.setup(config, mesh, workdir, ckpts).state
  finally:
    ckpts.close()
  folder = os.path.join(workdir, "kshot")
  os.makedirs(folder, exist_ok=True)
  params, stats = jax.device_get((state.params, state.batch_stats))
  backbone = os.path.join(folder, "backbone.npz")
  convert.save_converted({"backbone": {"params": params["backbone"],
                                       "batch_stats": stats["backbone"]},
                          "report": {"format": "bitune_jax", "arch": config.arch,
                                     "kind": config.method, "notes": [workdir],
                                     "dropped": []}}, backbone)
  results = {}
  for k in shots:
    run = ml_collections.ConfigDict(json.loads(config.to_json()))
    run.method, run.init_from, run.seed = "finetune", backbone, seed
    run.total_steps, run.data.kshot = total_steps, k
    run.eval_every = run.checkpoint_every = total_steps
    run.lr_mult = {"backbone": 0.1, "head": 1.0, "projector": 0.1, "source_head": 0.1}
    _, summary = train.train_and_evaluate(run, os.path.join(folder, f"k{k}_seed{seed}"))
    results[f"kshot_{k}_top1"] = summary["top1"]
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(prog="bitune-eval", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--which", choices=("latest", "best"), default="latest")
  parser.add_argument("--kshot", default="", help="e.g. 1,2,4,8: k-shot transfer too")
  parser.add_argument("--kshot_steps", type=int, default=100)
  args = parser.parse_args(argv)
  try:
    workdir = os.path.abspath(args.workdir)
    metrics = evaluate_workdir(workdir, which=args.which)
    if args.kshot:
      metrics.update(kshot_transfer(
          workdir, shots=[int(k) for k in args.kshot.split(",")],
          total_steps=args.kshot_steps))
      with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(metrics, f, indent=2)
  except ValueError as e:
    parser.exit(2, f"bitune-eval: error: {e}\n")
  print(json.dumps(metrics, indent=2))
  return 0


if __name__ == "__main__":
  main()
