"""Deprecated: the digits comparison is a `bitune-sweep` grid now.

  python -m bitune_jax.compare --workdir DIR [--methods finetune,bituning] [--seeds 0,1]
      [--total_steps 300] [--pretrain_steps 400] [--kshot_steps 100]

runs, and prints the command of,

  bitune-sweep --methods M --datasets digits --rates 25 --seeds S --workdir DIR
      [--set total_steps=N] [--set pretrain.total_steps=N] [--kshot_steps N]

(every method from one source model pre-trained once on digits 0-4, fine-tuned on
digits 5-9 at the demo's 25%; methods trained without labels reported by the feature
protocols and k-shot transfer). Its table is `DIR/results.md`; the offline grid of the
README is `bitune-sweep --spec configs/tables/digits.py`.
"""

import argparse
import shlex
import sys

from bitune_jax import methods, sweep


def sweep_argv(args) -> list[str]:
  """The `bitune-sweep` arguments of a `compare` command line."""
  argv = ["--methods", args.methods, "--datasets", "digits", "--rates", "25",
          "--seeds", args.seeds, "--workdir", args.workdir,
          "--kshot_steps", str(args.kshot_steps)]
  if args.total_steps:
    argv += ["--set", f"total_steps={args.total_steps}"]
  if args.pretrain_steps:
    argv += ["--set", f"pretrain.total_steps={args.pretrain_steps}"]
  return argv


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--methods", default=",".join(methods.METHODS))
  parser.add_argument("--seeds", default="0", help="comma-separated")
  parser.add_argument("--total_steps", type=int, default=0, help="0: the demo's")
  parser.add_argument("--pretrain_steps", type=int, default=0, help="0: the demo's")
  parser.add_argument("--kshot_steps", type=int, default=100)
  args = parser.parse_args(argv)
  forwarded = sweep_argv(args)
  print("bitune_jax.compare is deprecated; running: bitune-sweep "
        + " ".join(shlex.quote(a) for a in forwarded), file=sys.stderr)
  return sweep.main(forwarded)


if __name__ == "__main__":
  sys.exit(main())
