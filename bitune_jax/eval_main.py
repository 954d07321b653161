"""`bitune-eval --workdir DIR [--which latest|best]`: the papers' evaluation protocols on
a run's checkpoint.

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

from bitune_jax import checkpoint, evaluate, sharding, train


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
  data = run.data
  metrics = {"step": int(state.step), "checkpoint": which}
  if not getattr(run.method, "FEATURE_EVAL", False):  # a classifier to evaluate
    metrics.update(train.run_eval(run, state, config, mesh))
  train_f, test_f = (train.extract_features(run, state, data[f"{split}_images"],
                                            batch_size=config.eval_batch_size, mesh=mesh)
                     for split in ("train", "test"))
  metrics.update(evaluate.feature_metrics(train_f, data["train_labels"], test_f,
                                          data["test_labels"],
                                          num_classes=config.num_classes))
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  return metrics


def main(argv=None):
  parser = argparse.ArgumentParser(prog="bitune-eval", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--which", choices=("latest", "best"), default="latest")
  args = parser.parse_args(argv)
  try:
    metrics = evaluate_workdir(os.path.abspath(args.workdir), which=args.which)
  except ValueError as e:
    parser.exit(2, f"bitune-eval: error: {e}\n")
  print(json.dumps(metrics, indent=2))
  return 0


if __name__ == "__main__":
  main()
