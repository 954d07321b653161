"""The accelerator check of `bench/device.sh`: runs the README's quick start, then each
measurement of `bench/device_phases.py` in its own process with its own time limit,
within one deadline for the whole check, and writes every result (or the phase's
error) into one JSON file. Imports nothing that touches the accelerator: each phase
takes it in turn, whole.

  python bench/device.py --out FILE [--dry_run] [--peak_tflops X] [--skip a,b]
      [--started EPOCH_SECONDS] [--install TEXT]

Sizes: ResNet-50 at 224 px, batch 48 per device, bf16 activations, Bi-tuning's C = 200
classes and K = 32 keys per class (CUB at 100%), Co-Tuning's 1000 source classes,
MoCo's queue of 65536; `--dry_run`: the same phases at tiny sizes (the digits demo's
small ResNet at 32 px, batch 8, 2 repetitions) so that a CPU checks the whole path.

JSON (numbers in ms, GFLOP, TFLOP/s, examples/s; a failed phase is `{"error": ...}`):
  device         {platform, kind, count, jax, peak_tflops, peak_source, cpu_cores}
  quickstart     {seconds, top1, mean_class_acc}
  steps.<method> {global_batch, step_ms, step_ms_min, model_gflop_per_step,
                  tflop_per_s, mfu, xla_gflop_per_step}   method: finetune, bituning,
                                                          cotuning, unsup_finetune
  bituning_head  {head_ms, step_ms, share}   the head alone (at the step's shapes) /
                                            the Bi-tuning step
  device_views.<kind> {views_ms, step_ms, share}   the two views of a batch made alone
                 on the device / the step that uses them: reference / Bi-tuning's,
                 moco / unsupervised fine-tuning's (steps.<method> time the step on
                 ready views)
  host_input     {threads, <kind>: {examples_per_s_all_cores, examples_per_s_one_core}}
"""

import argparse
import collections
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETUPS = {
    "full": dict(arch="resnet50", image_size=224, batch_per_device=48, bf16=True,
                 queue_per_class=32, source_classes=1000, unsup_queue=65536, reps=20,
                 host_images=256, host_seconds=3.0, quickstart_overrides=[], env={}),
    "dry_run": dict(arch="resnet_small", image_size=32, batch_per_device=8, bf16=True,
                    queue_per_class=4, source_classes=1000, unsup_queue=256, reps=2,
                    host_images=8, host_seconds=0.3,
                    quickstart_overrides=["--config.total_steps=2",
                                          "--config.pretrain.total_steps=2",
                                          "--config.eval_every=2",
                                          "--config.checkpoint_every=2"],
                    # Compiled for compile speed (tests/conftest.py's flag: LLVM at
                    # -O0); run speed is no matter here
                    env={"XLA_FLAGS": "--xla_backend_optimization_level=0"}),
}
METHODS = ("finetune", "bituning", "cotuning", "unsup_finetune")
# (phase, its own limit in seconds), in the order run: what matters most first.
PHASES = (("probe", 60), ("quickstart", 150), ("step_finetune", 90),
          ("step_bituning", 100), ("step_cotuning", 90), ("step_unsup_finetune", 100),
          ("head", 40), ("views_reference", 40), ("views_moco", 40), ("host", 60))
# The steps that use each phase measured alone (its share of that step's time).
SHARE_OF = {"head": "bituning", "views_reference": "bituning",
            "views_moco": "unsup_finetune"}
BUDGET_S = 460  # the whole check, install included: under 8 minutes
RESERVE_S = 5  # kept for writing the results
MODULES = {"measurements": ("jax", "flax", "optax", "ml_collections", "PIL", "etils"),
           "quickstart": ("clu", "tensorflow", "orbax.checkpoint", "sklearn",
                          "tensorboard", "matplotlib")}


def _say(text):
  print(f"[device] {text}", flush=True)


# --------------------------------------------------------------------------- processes
def _run(name, command, limit, env):
  """`(exit code or None if stopped at its limit, last lines of its output)`; the
  output is printed as it comes, each line prefixed with the phase."""
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace",
                          start_new_session=True)
  tail = collections.deque(maxlen=20)

  def pump():
    for line in proc.stdout:
      tail.append(line.rstrip())
      print(f"  {name}| {line.rstrip()}", flush=True)
  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  try:
    code = proc.wait(timeout=limit)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the phase and anything it started
    proc.wait()
    code = None
  reader.join(timeout=5)
  return code, list(tail)


def _error_from(code, tail, limit):
  if code is None:
    return f"timed out after {limit:.0f} s"
  lines = [line for line in tail if line.strip()]
  return f"exit code {code}: {lines[-1] if lines else 'no output'}"


def _phase(name, limit, setup, env, work, peak):
  result = os.path.join(work, f"{name}.json")
  command = [sys.executable, os.path.join(HERE, "device_phases.py"), name,
             "--setup", json.dumps(setup), "--result", result]
  if peak:
    command += ["--peak_tflops", str(peak)]
  code, tail = _run(name, command, limit, env)
  if code is None or not os.path.exists(result):
    return {"error": _error_from(code, tail, limit)}
  with open(result) as f:
    return json.load(f)


def _quickstart(limit, setup, env, work):
  """The README's quick start (`bitune-train --config configs/bituning.py:demo`), run
  from this checkout as `python -m bitune_jax.cli.train`."""
  workdir = os.path.join(work, "quickstart")
  command = [sys.executable, "-m", "bitune_jax.cli.train", "--config",
             "configs/bituning.py:demo", "--workdir", workdir,
             *setup["quickstart_overrides"]]
  _say("quickstart: " + " ".join(command[1:]))
  start = time.time()
  code, tail = _run("quickstart", command, limit, env)
  summary = os.path.join(workdir, "summary.json")
  if code != 0 or not os.path.exists(summary):
    return {"error": _error_from(code, tail, limit)}
  with open(summary) as f:
    summary = json.load(f)
  return {"seconds": time.time() - start, "top1": summary["top1"],
          "mean_class_acc": summary["mean_class_acc"], "steps": summary["step"]}


# --------------------------------------------------------------------------- checks
def _bad_numbers(section, where=""):
  """Names of the values of `section` that are not finite positive numbers (a share
  must be below 1, an MFU at most 1), and the errors it records."""
  bad = []
  for key, value in section.items():
    name = f"{where}{key}"
    if key == "error":
      bad.append(f"{where.rstrip('.')}: {value}")
    elif isinstance(value, dict):
      bad += _bad_numbers(value, name + ".")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      limit = 1.0 if key in ("mfu", "share", "top1", "mean_class_acc") else math.inf
      if not (math.isfinite(value) and 0 < value <= limit and
              (key != "share" or value < 1)):
        bad.append(f"{name} = {value}")
  return bad


def _missing_modules(env):
  code = ("import importlib.util as u, json, sys\n"
          f"groups = {MODULES!r}\n"
          "out = {}\n"
          "for g, mods in groups.items():\n"
          "  miss = []\n"
          "  for m in mods:\n"
          "    try:\n"
          "      ok = u.find_spec(m) is not None\n"
          "    except ImportError:\n"
          "      ok = False\n"
          "    if not ok: miss.append(m)\n"
          "  out[g] = miss\n"
          "print(json.dumps(out))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, check=False)
  return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-300:]}


# --------------------------------------------------------------------------- main
def _share(alone, steps, method, key):
  """`alone` (a phase's result) with the step time of `method` and its share of it."""
  if "error" in alone:
    return alone
  step_ms = steps[method].get("step_ms")
  if not step_ms:
    return {"error": f"no {method} step time (step_{method}: "
                     f"{steps[method].get('error', 'no step_ms')})"}
  return dict(alone, step_ms=step_ms, share=alone[key] / step_ms)


def _assemble(results, setup, args, started):
  get = lambda name: results.get(name, {"error": "not run"})  # noqa: E731
  steps = {m: get(f"step_{m}") for m in METHODS}
  return {
      "what": "bitune_jax accelerator check (bench/device.sh)",
      "dry_run": args.dry_run, "install": args.install,
      "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
      "setup": {k: v for k, v in setup.items() if k not in ("quickstart_overrides", "env")},
      "flops": "model FLOPs: every convolution and matrix product of the train step's "
               "jaxpr, 2 per multiply-add (bench/device_phases.py)",
      "device": get("probe"), "missing_modules": results.get("missing_modules", {}),
      "quickstart": get("quickstart"), "steps": steps,
      "bituning_head": _share(get("head"), steps, SHARE_OF["head"], "head_ms"),
      "device_views": {k: _share(get(f"views_{k}"), steps, SHARE_OF[f"views_{k}"],
                                 "views_ms") for k in ("reference", "moco")},
      "host_input": get("host")}


def _run_phases(setup, skip, deadline, peak):
  """Each phase in turn, within its own limit and the deadline: `{phase: result}`."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", **setup["env"],
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  results = {}
  with tempfile.TemporaryDirectory(prefix="bitune-device-") as work:
    # One compilation cache for the phases: what they share (the GPU's autotuning of
    # the same convolutions) is done once.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(work, "jax_cache"))
    results["missing_modules"] = _missing_modules(env)
    _say(f"modules missing: {results['missing_modules']}")
    for name, own in PHASES:
      limit = min(own, deadline - time.time() - RESERVE_S)
      if name in skip or limit < 10:
        results[name] = {"error": "skipped (--skip)" if name in skip else
                                  "not run: the check's time budget was spent"}
        _say(f"{name}: {results[name]['error']}")
        continue
      _say(f"{name}: started (limit {limit:.0f} s)")
      start = time.time()
      results[name] = (_quickstart(limit, setup, env, work) if name == "quickstart" else
                       _phase(name, limit, setup, env, work, peak))
      if name == "probe":
        peak = peak or results[name].get("peak_tflops") or 0.0
      outcome = results[name].get("error")
      _say(f"{name}: {'FAILED: ' + outcome if outcome else 'done'} in "
           f"{time.time() - start:.0f} s")
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="the JSON file to write")
  parser.add_argument("--dry_run", action="store_true", help="tiny sizes (CPU check)")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="the device's peak for MFU (default: from its kind)")
  parser.add_argument("--skip", default="", help="phases not to run, comma-separated")
  parser.add_argument("--started", type=float, default=0.0,
                      help="epoch seconds when the check began (default: now); it ends "
                           f"within {BUDGET_S} s of it")
  parser.add_argument("--install", default="(not given)", help="what the install used")
  args = parser.parse_args()
  started = args.started or time.time()
  skip = {s for s in args.skip.split(",") if s}
  unknown = skip - {name for name, _ in PHASES}
  if unknown:
    print(f"device.py: unknown phase(s) in --skip: {', '.join(sorted(unknown))}; "
          f"phases: {', '.join(name for name, _ in PHASES)}", file=sys.stderr)
    sys.exit(2)
  setup = SETUPS["dry_run" if args.dry_run else "full"]
  results = _run_phases(setup, skip, started + BUDGET_S, args.peak_tflops)
  report = _assemble(results, setup, args, started)
  report["problems"] = _bad_numbers({k: report[k] for k in (
      "device", "quickstart", "steps", "bituning_head", "device_views", "host_input")})
  report["seconds_total"] = time.time() - started
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
  os.replace(args.out + ".tmp", args.out)
  _summary(report, args.out)


def _summary(report, path):
  print("\n=== accelerator check " + ("(dry run) " if report["dry_run"] else "") + "===")
  device = report["device"]
  print(f"device: {device.get('count')} x {device.get('kind')}, peak "
        f"{device.get('peak_tflops')} TFLOP/s ({device.get('peak_source')})")
  for method, v in report["steps"].items():
    mfu = v.get("mfu", math.nan)
    print(f"  {method:15s} " + (v["error"] if "error" in v else
                                f"{v['step_ms']:8.2f} ms/step, MFU {mfu:.1%}"))
  parts = [("Bi-tuning head", report["bituning_head"], "head_ms")] + [
      (f"{kind} views", v, "views_ms") for kind, v in report["device_views"].items()]
  for what, v, key in parts:
    print(f"  {what:15s} " + (v["error"] if "error" in v else
                              f"{v[key]:8.2f} ms, {v['share']:.1%} of the step"))
  host = report["host_input"]
  for kind in ("reference", "moco"):
    if kind in host:
      print(f"  host input, {kind} views: {host[kind]['examples_per_s_all_cores']:.0f} "
            f"examples/s on {host['threads']} threads")
  if "error" in host:
    print(f"  host input: {host['error']}")
  print(f"problems: {len(report['problems'])}" +
        "".join(f"\n  {p}" for p in report["problems"]))
  print(f"{report['seconds_total']:.0f} s in all; written to {path}")


if __name__ == "__main__":
  main()
