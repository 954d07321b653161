"""One phase of `bench/device.sh`, measured in its own process (so that a phase that
hangs or fails costs only itself): the functions of `bench/step.py`,
`bench/loss_head.py` and `bench/input.py` at the sizes `bench/device.py` passes.

  python bench/device_phases.py PHASE --setup JSON --result FILE [--peak_tflops X]

PHASE: `probe` (the device and its peak), `step_<method>` (a train step's time, FLOPs
and MFU), `head` (the Bi-tuning head alone at the step's shapes), `views_<kind>` (the
device views alone and the Bi-tuning step that makes them), `host` (the host's input
rate). Writes a JSON object of numbers to FILE, or `{"error": ...}`.

Model FLOPs of a step: every convolution and matrix product of the train step's jaxpr
(the forward and backward passes, the key encoder's forward, the heads and losses), 2
per multiply-add, counted from their shapes; elementwise work (BatchNorm, EMA, the
optimiser) is not counted. For vanilla fine-tuning this is the usual 3x the forward.
XLA's own count of the compiled step (`cost_analysis`) is reported beside it.
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import input as input_bench  # noqa: E402  pylint: disable=g-import-not-at-top
import loss_head  # noqa: E402  pylint: disable=g-import-not-at-top
import step as step_bench  # noqa: E402  pylint: disable=g-import-not-at-top

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bitune_jax import models, sharding  # noqa: E402
from bitune_jax.data.views import augment, crop  # noqa: E402

CPU_GHZ, CPU_FLOP_PER_CYCLE = 3.0, 32  # nominal: AVX2, two float32 FMA units per core


def _say(phase, text):
  print(f"[{phase}] {text}", flush=True)


# --------------------------------------------------------------------------- flops
def jaxpr_flops(jaxpr):
  """2 x the multiply-adds of every `dot_general` and `conv_general_dilated` in a
  (Closed)Jaxpr, its sub-jaxprs included (a scan's body times its length, a cond's
  costliest branch, a while loop's body once)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name, out = eqn.primitive.name, eqn.outvars[0].aval.shape
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(lhs[d] for d in contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape  # [out feature, in feature / groups, *window]
      spec = eqn.params["dimension_numbers"].rhs_spec
      total += 2 * math.prod(out) * rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
    if name == "cond":
      total += max(_sub_flops(b) for b in eqn.params["branches"])
    elif name == "scan":
      total += eqn.params["length"] * _sub_flops(eqn.params["jaxpr"])
    else:  # pjit, remat, custom_jvp/vjp calls, a while loop's cond and body: once
      total += sum(_sub_flops(v) for v in eqn.params.values())
  return total


def _sub_flops(value):
  if hasattr(value, "eqns") or hasattr(getattr(value, "jaxpr", None), "eqns"):
    return jaxpr_flops(value)
  return 0


# --------------------------------------------------------------------------- phases
def probe(setup, peak_flag):
  del setup
  device = jax.devices()[0]
  peak, kind = step_bench.peak_tflops()
  source = f"table: {kind} dense bf16"
  if peak_flag:
    peak, source = peak_flag, "--peak_tflops"
  elif peak is None and device.platform == "cpu":
    peak = os.cpu_count() * CPU_GHZ * CPU_FLOP_PER_CYCLE / 1e3
    source = (f"nominal CPU: {os.cpu_count()} cores x {CPU_GHZ} GHz x "
              f"{CPU_FLOP_PER_CYCLE} float32 FLOP/cycle")
  return {"platform": device.platform, "kind": kind, "count": jax.device_count(),
          "jax": jax.__version__, "peak_tflops": peak,  # of one device
          "peak_source": source if peak else "unknown: pass --peak_tflops",
          "cpu_cores": os.cpu_count()}


def _global_batch(setup):
  return setup["batch_per_device"] * jax.device_count()


def _config(setup, method):
  config = step_bench.make_config(
      setup["arch"], setup["image_size"], _global_batch(setup), method, setup["bf16"],
      queue_size=setup["queue_per_class"])
  if method == "cotuning":
    config.cotuning.source_classes = setup["source_classes"]
  if method == "unsup_finetune":
    config.unsup.queue_size = setup["unsup_queue"]
    # Shuffled BatchNorm per group: the largest divisor of the batch up to 32 (MoCo's
    # 32 per GPU; 24 at batch 48).
    batch = config.batch_size
    config.unsup.bn_group_size = max(g for g in range(1, 33) if batch % g == 0)
  return config


def step(setup, peak, method):
  config = _config(setup, method)
  _say(f"step_{method}", f"compiling the step: {config.arch} {config.image_size}px batch "
       f"{config.batch_size} {'bf16' if config.bf16 else 'float32'}")
  compiled = step_bench.compiled_step(config)
  times = [compiled.run() for _ in range(setup["reps"])]
  flops = jaxpr_flops(compiled.trace())
  seconds = statistics.median(times)
  out = {"global_batch": config.batch_size, "step_ms": 1e3 * seconds,
         "step_ms_min": 1e3 * min(times), "model_gflop_per_step": flops / 1e9,
         "tflop_per_s": flops / seconds / 1e12,
         "xla_gflop_per_step": compiled.flops / 1e9 if compiled.flops > 0 else None}
  if peak:  # the step's FLOPs over every device's peak
    out["mfu"] = flops / seconds / 1e12 / (peak * jax.device_count())
  _say(f"step_{method}", f"{out['step_ms']:.2f} ms/step (median of {len(times)}), "
       f"{out['model_gflop_per_step']:.1f} GFLOP, {out['tflop_per_s']:.2f} TFLOP/s"
       + (f", MFU {out['mfu']:.1%}" if peak else ""))
  return out


def head(setup, peak):
  del peak
  config = _config(setup, "bituning")
  case = (config.num_classes, config.bituning.queue_size, config.batch_size,
          models.num_features(config.arch), config.bituning.projector_dim)  # the step's
  _say("head", f"CCE + CCL + enqueue at (C, K, B, F, D) = {case}")
  seconds = loss_head.bench_jax(case, loss_head.make_inputs(case), setup["reps"])
  _say("head", f"{1e3 * seconds:.2f} ms")
  return {"head_ms": 1e3 * seconds, "case_CKBFD": list(case)}


def views(setup, peak, kind):
  """The two views of a batch made alone on the device (`bench/input.py`'s timer);
  `bench/device.py` divides by the step that uses them (Bi-tuning's for the reference
  views, unsupervised fine-tuning's for MoCo's)."""
  del peak
  batch, size = _global_batch(setup), setup["image_size"]
  _say(f"views_{kind}", f"compiling the {kind} views of {batch} images at {size} px")
  run = input_bench.views_alone(*input_bench.views_input(
      kind, size=size, batch=batch, num_classes=200, mesh=sharding.make_mesh()))
  seconds = statistics.median(run() for _ in range(setup["reps"]))
  _say(f"views_{kind}", f"{1e3 * seconds:.2f} ms for two views of {batch} images")
  return {"views_ms": 1e3 * seconds}


def host(setup, peak):
  del peak
  mesh, size, cores = sharding.make_mesh(), setup["image_size"], os.cpu_count()
  encoded = input_bench.photos(setup["host_images"])
  out = {"threads": cores}
  with tempfile.TemporaryDirectory() as directory:
    for kind, side in (("reference", crop.eval_resize(size)),
                       ("moco", augment.moco_side(size))):
      pool, _ = input_bench.build_cache(encoded, side, directory, size)
      rates = {n: input_bench.host_rate(pool, batch=_global_batch(setup), mesh=mesh,
                                        seconds=setup["host_seconds"], threads=n)
               for n in (1, cores)}
      out[kind] = {"examples_per_s_all_cores": rates[cores],
                   "examples_per_s_one_core": rates[1]}
      _say("host", f"{kind} views (cache {side}px): {rates[cores]:.0f} two-view "
           f"examples/s on {cores} threads, {rates[1]:.0f} on one")
  return out


def run_phase(name, setup, peak):
  if name == "probe":
    return probe(setup, peak)
  if name.startswith("step_"):
    return step(setup, peak, name[len("step_"):])
  if name.startswith("views_"):
    return views(setup, peak, name[len("views_"):])
  if name in ("head", "host"):
    return {"head": head, "host": host}[name](setup, peak)
  raise ValueError(f"unknown phase {name!r}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("phase")
  parser.add_argument("--setup", required=True, help="JSON: the sizes (bench/device.py)")
  parser.add_argument("--result", required=True)
  parser.add_argument("--peak_tflops", type=float, default=0.0)
  args = parser.parse_args()
  start = time.perf_counter()
  try:
    result = run_phase(args.phase, json.loads(args.setup), args.peak_tflops)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    result = {"error": f"{type(e).__name__}: {e}"}
  result["phase_seconds"] = time.perf_counter() - start
  with open(args.result + ".tmp", "w") as f:
    json.dump(result, f, default=lambda v: v.item() if isinstance(v, np.generic) else v)
  os.replace(args.result + ".tmp", args.result)


if __name__ == "__main__":
  main()
