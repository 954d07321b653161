"""`bitune-eval --workdir DIR [--which latest|best] [--kshot 1,2,4,8]`: the papers'
evaluation protocols on a run's checkpoint.

Rebuilds the run from `DIR/config.json`, restores its checkpoint and reports test top-1
and mean per-class accuracy, and, on the backbone's pooled features (eval mode), top-5
retrieval accuracy (test images against the training set, cosine similarity), k-means
BCubed precision on the training features and a linear probe. Every evaluation runs
what it was asked to run and keeps its own record in `DIR/evals/`, named by what was
evaluated: `{which}-step{S}.json`, and `{which}-step{S}-kshot{k}-steps{N}-seed{s}.json`
for each k-shot transfer (trained afresh in `DIR/kshot/` each time).
"""

import argparse
import json
import logging
import os
import shutil

# jax, ml_collections and the training system are imported where they are used, so
# that `bitune-eval --help` and argument errors answer at once.
# pylint: disable=g-import-not-at-top

log = logging.getLogger("bitune_jax")

# The checkpoints a workdir holds, by the names bitune-eval and bitune-export share:
# the last one saved, and the one with the best evaluation. ('final' is latest's old
# name in bitune-export, still understood.)
WHICH = ("latest", "best")


def which_checkpoint(text):
  """`--which` of bitune-eval and bitune-export: 'final' -> 'latest'."""
  return "latest" if text == "final" else text


def add_version(parser):
  """`--version`: the installed package's."""
  from bitune_jax import console
  parser.add_argument("--version", action="version",
                      version=f"{parser.prog} {console.version()}")


def _load_config(workdir):
  """The run's `config.json`, in today's shape (`config_base.stored`: an older run's
  record carries every method's sections)."""
  import ml_collections
  from bitune_jax import config_base
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no config.json: not a bitune-train workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(config_base.stored(json.load(f)))


def _restore(workdir, config, which):
  """The run's `which` ('latest' or 'best') checkpoint: `(run, state)`."""
  import jax
  from bitune_jax import checkpoint, sharding, train
  which = which_checkpoint(which)
  if which not in WHICH:
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  mesh = sharding.make_mesh()
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    if ckpts.latest_step() is None:
      raise ValueError(f"no checkpoint in {ckpts.directory}")
    run = train.setup(config, mesh, workdir, ckpts)
    state = run.state
    if which == "best":
      state = ckpts.restore(jax.eval_shape(lambda: state), run.state_shardings, "best")
      if state is None:
        raise ValueError(f"{workdir} has no best checkpoint (no evaluation was saved)")
  finally:
    ckpts.close()
  return run, state, mesh


def _write_record(workdir, name, record):
  from bitune_jax import files
  path = os.path.join(workdir, "evals", f"{name}.json")
  files.write_once(path, json.dumps(record, indent=2))  # process 0, whole
  return path


def evaluate_workdir(workdir, *, which="latest", tsne=False):
  """The protocols on the `which` checkpoint; recorded in `evals/{which}-step{S}.json`.
  `tsne`: also a t-SNE of the test features, `plots/tsne-{which}-step{S}.png`."""
  from bitune_jax import train
  which = which_checkpoint(which)
  config = _load_config(workdir)
  run, state, mesh = _restore(workdir, config, which)
  if which == "best":  # named by how it was chosen
    which = ("best-on-validation" if config.data.get("val_fraction", 0.0) > 0
             else "best-on-test")
  metrics = {"step": int(state.step), "checkpoint": which}
  log.info("evaluating %s's %s checkpoint, step %d", workdir, which, metrics["step"])
  if run.method.evaluation == "classifier":  # a classifier to evaluate
    metrics.update(train.run_eval(run, state, config, mesh))
    log.info("test top-1 %.4f, mean per-class accuracy %.4f", metrics["top1"],
             metrics["mean_class_acc"])
  log.info("feature protocols: top-5 retrieval, k-means BCubed, a linear probe")
  metrics.update(train.feature_eval(run, state, config, mesh))
  if tsne:
    log.info("t-SNE of the test features (a minute or two on a CPU)")
    import jax
    from bitune_jax import plots
    features, labels = train.extract_features(run, state, run.data.test,
                                              batch_size=config.eval_batch_size,
                                              mesh=mesh)
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
  import jax
  import ml_collections
  from bitune_jax import config_base, convert, files, train
  which = which_checkpoint(which)
  config = _load_config(workdir)
  _, state, _ = _restore(workdir, config, which)
  step = int(state.step)
  folder = os.path.join(workdir, "kshot", f"{which}-step{step}")
  os.makedirs(folder, exist_ok=True)
  params, stats = jax.device_get((state.params, state.batch_stats))
  backbone = os.path.join(folder, "backbone.npz")
  if jax.process_index() == 0:  # one writer; the others wait below, then read it
    convert.save_converted({"backbone": {"params": params["backbone"],
                                         "batch_stats": stats["backbone"]},
                            "report": {"format": "bitune_jax", "arch": config.arch,
                                       "kind": config.method,
                                       "notes": [f"{workdir} {which} step {step}"],
                                       "dropped": []}}, backbone)
  results = {}
  for i, k in enumerate(shots, 1):
    log.info("k-shot transfer %d/%d: k = %d, %d steps", i, len(shots), k, total_steps)
    # Vanilla fine-tuning's config: the run's, without its method's sections.
    run = ml_collections.ConfigDict(config_base.stored(
        dict(json.loads(config.to_json()), method="finetune")))
    run.init_from, run.seed = backbone, seed
    run.total_steps, run.data.kshot = total_steps, k
    run.eval_every = run.checkpoint_every = total_steps
    run.log_every = min(run.log_every, total_steps)
    run.lr_mult = {"backbone": 0.1, "head": 1.0, "projector": 0.1, "source_head": 0.1}
    name = f"k{k}-steps{total_steps}-seed{seed}"
    run_dir = os.path.join(folder, name)
    if os.path.exists(run_dir) and jax.process_index() == 0:
      shutil.rmtree(run_dir)  # run what was asked, not an earlier run's result
    files.sync(f"k-shot {name} ready")  # the backbone written, the old run removed
    _, summary = train.train_and_evaluate(run, run_dir)
    results[f"kshot_{k}_top1"] = summary["top1"]
    log.info("k-shot transfer, k = %d: test top-1 %.4f", k, summary["top1"])
    _write_record(workdir, f"{which}-step{step}-kshot{k}-steps{total_steps}-seed{seed}",
                  {"step": step, "checkpoint": which, "k": k, "kshot_steps": total_steps,
                   "seed": seed, "top1": summary["top1"], "run": run_dir})
  return results


def _parse_shots(text, steps):
  try:
    shots = [int(k) for k in text.split(",")]
  except ValueError:
    shots = []
  if not shots or min(shots) < 1:
    raise ValueError(f"--kshot must be comma-separated positive integers, e.g. 1,2,4,8; "
                     f"got {text!r}")
  if steps < 1:
    raise ValueError(f"--kshot_steps must be >= 1, got {steps}")
  return shots


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="bitune-eval", description=__doc__.split("\n\n")[0].replace("\n", " "),
      epilog="Records: DIR/evals/{which}-step{S}.json and, per k, "
             "DIR/evals/{which}-step{S}-kshot{k}-steps{N}-seed0.json.")
  parser.add_argument("--workdir", required=True,
                      help="a bitune-train workdir (holds config.json and checkpoints/)")
  parser.add_argument("--which", choices=WHICH, type=which_checkpoint, default="latest",
                      help="the checkpoint to evaluate: the last one saved, or the one "
                           "with the best test score (default: latest)")
  parser.add_argument("--kshot", default="",
                      help="also fine-tune the backbone with k labelled images per class "
                           "for each k listed (e.g. 1,2,4,8) and report each test top-1")
  parser.add_argument("--kshot_steps", type=int, default=100,
                      help="training steps of each k-shot run (default: 100)")
  parser.add_argument("--tsne", action="store_true",
                      help="also draw a t-SNE of the test features, coloured by class "
                           "(DIR/plots/tsne-{which}-step{S}.png)")
  parser.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                      help="process 0's address, to run as one of several processes "
                           "(jax.distributed; with --num_processes and --process_id)")
  parser.add_argument("--num_processes", type=int, default=None,
                      help="how many processes run this command")
  parser.add_argument("--process_id", type=int, default=None,
                      help="this process's index in [0, num_processes)")
  add_version(parser)
  args = parser.parse_args(argv)
  try:
    from bitune_jax import config_base, console, sharding, workdir_lock
    console.setup()  # our progress lines; orbax, clu, absl only from warnings up
    workdir = os.path.abspath(config_base.expand_path(args.workdir))
    sharding.initialize_multihost(
        bool(_load_config(workdir).get("multi_host", False)),
        args.coordinator_address, args.num_processes, args.process_id)
    shots = _parse_shots(args.kshot, args.kshot_steps) if args.kshot else None
    # Every evaluation writes into the workdir (evals/, plots/, kshot/) and reads its
    # checkpoints: not while a training run (or another evaluation) is in it.
    with workdir_lock.hold(workdir, "bitune-eval"):
      metrics = evaluate_workdir(workdir, which=args.which, tsne=args.tsne)
      if shots:
        metrics.update(kshot_transfer(workdir, shots=shots,
                                      total_steps=args.kshot_steps, which=args.which))
  except ValueError as e:
    parser.exit(2, f"bitune-eval: error: {e}\n")
  import jax
  if jax.process_index() == 0:  # process 0 reports for all
    print(json.dumps(metrics, indent=2))
  return 0


if __name__ == "__main__":
  main()
