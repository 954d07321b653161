"""Runs every method on the embedded digits transfer task and prints one table.

  python -m bitune_jax.compare --workdir /tmp/bitune-compare [--methods finetune,bituning]
      [--total_steps 300] [--seeds 0]

The source model (supervised pre-training on digits 0-4) is trained once and shared:
every method starts from the same checkpoint, through the same `init_from` path as a
converted PyTorch checkpoint, and fine-tunes on digits 5-9 at the demo's sampling rate.
Methods trained without labels (unsupervised fine-tuning) are reported by the feature
protocols and k-shot transfer (k = 1, 2, 4, 8). Each run leaves its own workdir (`DIR/<method>_seed<k>`) with TensorBoard logs,
checkpoints and summary.json; a finished run is not repeated.
"""

import argparse
import importlib
import json
import logging
import os
import statistics

from bitune_jax import console, methods

KSHOTS = (1, 2, 4, 8)
log = logging.getLogger("bitune_jax")


def _config(method, seed, total_steps, init_from):
  """The shipped `configs/<method>.py:demo`, with the shared source model."""
  config = importlib.import_module(f"bitune_jax.configs.{method}").get_config("demo")
  config.seed = seed
  if total_steps:
    config.total_steps = total_steps
  if init_from:
    config.init_from = init_from
  return config


def _run(method, seed, total_steps, workdir, init_from, kshot_steps):
  from bitune_jax import eval_main, train  # pylint: disable=g-import-not-at-top
  done = os.path.join(workdir, "summary.json")
  config = _config(method, seed, total_steps, init_from)
  summary = None
  if os.path.exists(done):
    with open(done) as f:
      summary = json.load(f)
  if summary is None or summary.get("step") != config.total_steps:
    summary = train.train_and_evaluate(config, workdir)[1]
  if getattr(methods.get(method), "FEATURE_EVAL", False) and kshot_steps:
    summary.update(eval_main.kshot_transfer(workdir, shots=KSHOTS, seed=seed,
                                            total_steps=kshot_steps))
  return summary


def _cell(values):
  mean = statistics.mean(values)
  return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def format_table(rows):
  """rows: `{method: [summary, ...]}` -> Markdown tables (mean ± std over seeds): the
  classifier's accuracies, then the feature protocols of methods trained without labels."""
  classify = {m: s for m, s in rows.items() if "top1" in s[0]}
  features = {m: s for m, s in rows.items() if "top1" not in s[0]}
  lines = []
  if classify:
    lines += ["| method | seeds | test top-1 | mean per-class |", "|---|---|---|---|"]
    lines += [f"| {m} | {len(s)} | {_cell([100 * x['top1'] for x in s])} | "
              f"{_cell([100 * x['mean_class_acc'] for x in s])} |"
              for m, s in classify.items()]
  if features:
    shots = [k for k in KSHOTS if all(f"kshot_{k}_top1" in x
                                      for s in features.values() for x in s)]
    lines += ["" if lines else None,
              "| method (no labels) | seeds | retrieval top-5 | k-means BCubed precision "
              "| linear probe top-1 |" + "".join(f" {k}-shot top-1 |" for k in shots),
              "|---|---|---|---|---|" + "---|" * len(shots)]
    lines += [f"| {m} | {len(s)} | {_cell([100 * x['retrieval_top5'] for x in s])} | "
              f"{_cell([100 * x['kmeans_bcubed_precision'] for x in s])} | "
              f"{_cell([100 * x['linear_probe_top1'] for x in s])} |"
              + "".join(f" {_cell([100 * x[f'kshot_{k}_top1'] for x in s])} |"
                        for k in shots)
              for m, s in features.items()]
  return "\n".join(line for line in lines if line is not None)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--methods", default=",".join(methods.METHODS))
  parser.add_argument("--seeds", default="0", help="comma-separated")
  parser.add_argument("--total_steps", type=int, default=0, help="0: the demo's")
  parser.add_argument("--pretrain_steps", type=int, default=0, help="0: the demo's")
  parser.add_argument("--kshot_steps", type=int, default=100,
                      help="k-shot transfer steps for methods trained without labels "
                           "(0: skip)")
  args = parser.parse_args(argv)
  names = args.methods.split(",")
  unknown = [m for m in names if m not in methods.METHODS]
  if unknown:
    parser.error(f"unknown methods {unknown}; known: {', '.join(methods.METHODS)}")
  console.setup()
  workdir = os.path.abspath(args.workdir)
  # The shared source model: made by the first run, through the demo's own path.
  source = os.path.join(workdir, "source", "pretrained", "digits_source.npz")
  if not os.path.exists(source):
    from bitune_jax import train  # pylint: disable=g-import-not-at-top
    config = _config("finetune", 0, 0, "")
    if args.pretrain_steps:
      config.pretrain.total_steps = args.pretrain_steps
    train._demo_pretrained(config, os.path.join(workdir, "source"))
  rows = {}
  for method in names:
    for seed in (int(s) for s in args.seeds.split(",")):
      rows.setdefault(method, []).append(
          _run(method, seed, args.total_steps,
               os.path.join(workdir, f"{method}_seed{seed}"), source,
               args.kshot_steps))
  table = format_table(rows)
  print(table)
  with open(os.path.join(workdir, "comparison.md"), "w") as f:
    f.write(table + "\n")
  return rows


if __name__ == "__main__":
  main()
