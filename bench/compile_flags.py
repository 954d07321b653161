"""Benchmark: the CPU time XLA's CPU compiler spends on one train step, by XLA flags.

The test suite compiles hundreds of small programs, and on a CPU machine compiling is
most of its time. tests/conftest.py sets flags that change how fast the compiled code
runs, not what it computes. This measures them, in one run on one machine: for each
flag set, a fresh process builds the digits demo's train step (8 simulated devices,
16 x 16 images, batch 16, as the tests' runs), compiles it (no compilation cache) and
runs one step. It prints the compiler's CPU seconds (every thread; steadier than wall
time on a shared machine), their ratio to XLA's defaults, and the step's loss, which
must be the same under every flag set (to float32 rounding, and the rounding's effect on
the in-step views: RandAugment's discrete operations).

The older fusion emitters (`--xla_cpu_use_fusion_emitters=false`) are measured but not
used: they round the same expression differently in different programs (measured on this
project's machine, an AMD EPYC without AVX-512, 2026-12-07: FixMatch's views made inside
a larger program against the same views compiled alone, 1 ulp apart on 3842 values and
0.14 apart on 36 pixels of a RandAugment view), and the tests compute a step's reference
from its views rebuilt in a program of their own (tests/conftest.py). Under the fusion
emitters (at the suite's -O0) the two are bitwise equal. The loss printed here does not
show it: each flag set compiles one program.

Usage:
  python bench/compile_flags.py                  # Bi-tuning, 3 repetitions, interleaved
  python bench/compile_flags.py --method unsup_finetune --reps 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG_SETS = {
    "XLA's defaults": "",
    "LLVM -O0 (the tests')": "--xla_backend_optimization_level=0",
    "LLVM -O0, older fusion emitters (not used: see above)":
        "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
}

_CHILD = r"""
import importlib, json, resource, sys
import jax
from bitune_jax import sharding
from bitune_jax.training import loop

def cpu():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime

config = importlib.import_module("bitune_jax.configs." + sys.argv[1]).get_config("demo")
config.init_from, config.image_size, config.batch_size = "none", 16, 16
config.eval_batch_size = 64
mesh = sharding.make_mesh()
run = loop.setup(config, mesh)
batch = next(iter(loop.train_batches(run, mesh, 0)))
lowered = run.train_step.trace(run.state, batch).lower()
before = cpu()
compiled = lowered.compile()
seconds = cpu() - before
_, metrics = compiled(run.state, batch)
print(json.dumps({"compile_cpu_s": seconds, "loss": float(metrics["loss"])}))
"""


def methods():
  """The methods' names, for `--method`."""
  sys.path.insert(0, _ROOT)
  from bitune_jax import methods as registry  # pylint: disable=g-import-not-at-top
  return sorted(registry.METHODS)


def run_child(code, args, flags, failure):
  """`python -c code *args` in a fresh process of 8 CPU devices under XLA_FLAGS `flags`,
  no compilation cache (a real compile every time): the JSON of its last printed line.
  Exits with `failure` and the child's error if it fails."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {flags}".strip())
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  proc = subprocess.run([sys.executable, "-c", code, *args], cwd=_ROOT, env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise SystemExit(f"{failure}:\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(method, flags):
  return run_child(_CHILD, [method], flags, f"compile_flags.py: the {method} step failed "
                   f"to compile under XLA_FLAGS={flags!r}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--method", default="bituning", choices=methods(),
                      help="whose demo step to compile (default: bituning)")
  parser.add_argument("--reps", type=int, default=3,
                      help="repetitions of each flag set, interleaved (default: 3)")
  parser.add_argument("--flags", action="append", default=[],
                      help="another flag set to measure (repeatable), e.g. "
                           "'--xla_backend_optimization_level=0 --xla_cpu_opt_preset=...'")
  args = parser.parse_args(argv)
  FLAG_SETS.update({flags: flags for flags in args.flags})
  if args.reps < 1:
    parser.error(f"--reps must be >= 1, got {args.reps}")
  results = {name: [] for name in FLAG_SETS}
  for rep in range(args.reps):  # interleaved: a slow spell of the machine hits every set
    for name, flags in FLAG_SETS.items():
      results[name].append(measure(args.method, flags))
      print(f"rep {rep + 1}/{args.reps}  {name}: "
            f"{results[name][-1]['compile_cpu_s']:.2f} CPU s", file=sys.stderr)
  base = statistics.median(r["compile_cpu_s"] for r in results["XLA's defaults"])
  print(f"{args.method} demo step, 8 CPU devices: compile CPU seconds "
        f"(median of {args.reps})")
  for name, runs in results.items():
    seconds = statistics.median(r["compile_cpu_s"] for r in runs)
    losses = sorted({f"{r['loss']:.6f}" for r in runs})
    print(f"  {name:60s} {seconds:6.2f} s  x{seconds / base:.2f}  loss {', '.join(losses)}")


if __name__ == "__main__":
  main()
