"""Benchmark: how much of a train step's compile, and of its state's init, is random draws.

Every `jax.random` call (a split, a uniform, a Bernoulli, ...) compiles to a threefry
loop of its own on XLA's CPU backend, and the suite's time is mostly XLA compiling
(tests/conftest.py prints the CPU by test file). This measures the most that any
rearrangement of the draws could save: for each method, a fresh process builds the
digits demo's run (8 simulated devices, 16 x 16 images, batch 16, the tests' LLVM -O0,
no compilation cache) and compiles its train step three ways:

  as it is            the library's draws;
  views not random    the draws of the data views (crop, flip, colour, blur,
                      RandAugment, CutMix) replaced by cheap functions of their keys;
  nothing random      every `jax.random` draw so replaced, the network's init included.

The two replacements compute other numbers (no view is random any more): they measure
compile time only, and their runs are thrown away. Printed: the CPU seconds of the
run's setup (data, the state's init: its compile is most of it) and of the step's
compile, medians over the repetitions (interleaved, so a slow spell of the machine hits
every variant), and each one's ratio to "as it is".

Usage:
  python bench/compile_random.py                       # bituning and unsup_finetune, 3 reps
  python bench/compile_random.py --method bituning --reps 5
"""

import argparse
import json
import statistics
import sys

import compile_flags  # bench/, beside this file

VARIANTS = ("as it is", "views not random", "nothing random")

_CHILD = r"""
import importlib, json, pkgutil, resource, sys
import jax
import jax.numpy as jnp

method, variant = sys.argv[1], sys.argv[2]
DRAWS = ("uniform", "bernoulli", "randint", "split", "fold_in", "permutation", "normal",
         "truncated_normal")


def _from_key(key):  # a number that depends on the key, at next to no compile cost
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  return data.astype(jnp.float32).sum() * 1e-12


STUBS = dict(
    uniform=lambda key, shape=(), dtype=jnp.float32, minval=0., maxval=1.: (
        jnp.broadcast_to(_from_key(key), shape).astype(dtype) * (maxval - minval) + minval),
    bernoulli=lambda key, p=0.5, shape=None: jnp.broadcast_to(
        _from_key(key) < p, () if shape is None else shape),
    randint=lambda key, shape, minval, maxval, dtype=jnp.int32: (
        jnp.broadcast_to(_from_key(key).astype(dtype), shape) + jnp.asarray(minval, dtype)),
    split=lambda key, num=2: jnp.stack([key] * (num if isinstance(num, int) else num[0])),
    fold_in=lambda key, data: key,
    permutation=lambda key, x, *a, **k: jnp.arange(x) if isinstance(x, int) else x,
    normal=lambda key, shape=(), dtype=jnp.float32: (
        jnp.broadcast_to(_from_key(key), shape).astype(dtype)),
    truncated_normal=lambda key, lower, upper, shape=(), dtype=jnp.float32: (
        jnp.broadcast_to(_from_key(key), shape).astype(dtype)),
)


class _Random:  # jax.random with the draws replaced
  def __getattr__(self, name):
    return STUBS[name] if name in STUBS else getattr(jax.random, name)


class _Jax:  # jax, its `random` replaced
  def __getattr__(self, name):
    return _Random() if name == "random" else getattr(jax, name)


if variant == "views not random":
  import bitune_jax.data.views as views
  for info in pkgutil.iter_modules(views.__path__):
    module = importlib.import_module("bitune_jax.data.views." + info.name)
    if hasattr(module, "jax"):
      module.jax = _Jax()
elif variant == "nothing random":
  for name, stub in STUBS.items():
    setattr(jax.random, name, stub)

from bitune_jax import sharding
from bitune_jax.training import loop


def cpu():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


config = importlib.import_module("bitune_jax.configs." + method).get_config("demo")
config.init_from, config.image_size, config.batch_size = "none", 16, 16
config.eval_batch_size = 64
mesh = sharding.make_mesh()
before = cpu()
run = loop.setup(config, mesh)
setup = cpu() - before
batch = next(iter(loop.train_batches(run, mesh, 0)))
lowered = run.train_step.trace(run.state, batch).lower()
before = cpu()
lowered.compile()
print(json.dumps({"setup_cpu_s": setup, "step_compile_cpu_s": cpu() - before}))
"""


def measure(method, variant):
  return compile_flags.run_child(_CHILD, [method, variant],
                                 "--xla_backend_optimization_level=0",
                                 f"compile_random.py: {method} ({variant}) failed")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--method", action="append", choices=compile_flags.methods(),
                      help="a method's demo (repeatable; default: bituning and "
                           "unsup_finetune)")
  parser.add_argument("--reps", type=int, default=3,
                      help="repetitions of each variant, interleaved (default: 3)")
  args = parser.parse_args(argv)
  if args.reps < 1:
    parser.error(f"--reps must be >= 1, got {args.reps}")
  methods = args.method or ["bituning", "unsup_finetune"]
  results = {(m, v): [] for m in methods for v in VARIANTS}
  for rep in range(args.reps):
    for method in methods:
      for variant in VARIANTS:
        results[method, variant].append(measure(method, variant))
        print(f"rep {rep + 1}/{args.reps}  {method}, {variant}: "
              f"{json.dumps(results[method, variant][-1])}", file=sys.stderr)
  print(f"CPU seconds, median of {args.reps} (8 CPU devices, 16 px, LLVM -O0)")
  for method in methods:
    median = {v: {k: statistics.median(r[k] for r in results[method, v])
                  for k in ("setup_cpu_s", "step_compile_cpu_s")} for v in VARIANTS}
    base = median["as it is"]
    for variant in VARIANTS:
      m = median[variant]
      print(f"  {method:15s} {variant:17s} setup {m['setup_cpu_s']:6.2f} "
            f"(x{m['setup_cpu_s'] / base['setup_cpu_s']:.2f})  step compile "
            f"{m['step_compile_cpu_s']:6.2f} "
            f"(x{m['step_compile_cpu_s'] / base['step_compile_cpu_s']:.2f})")


if __name__ == "__main__":
  main()
