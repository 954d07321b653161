"""Benchmark: Bi-tuning train step time over vanilla fine-tuning step time.

Same backbone, batch, machine and process; the real jitted, donated train steps of
`bitune_jax.methods` on a synthetic on-device batch (input pipeline excluded). Bi-tuning
adds one forward pass of the key encoder (train-mode BatchNorm), the EMA update of all
parameters, the CCE/CCL head and two enqueues: the floor is near 4/3 = 1.33 when the
backward pass costs twice the forward.

Cases: ResNet-50 at 224 with batch 16, ResNet-18 at 112 with batch 32, ViT-S/16 at 224
with batch 16 (`vit`; it also prints XLA's FLOPs of vanilla fine-tuning's compiled step
against the analytic count, 3 x the forward's matmuls, `models.vit.flops_per_image`);
C = 200 classes, K = 32 slots per class, as for CUB at 100%.

  python bench/step.py                 # CPU, float32
  python bench/step.py --gpu           # bf16 activations; also prints achieved TFLOP/s
                                       # and MFU against the device's bf16 peak
  python bench/step.py --cases r18 --reps 5

The last line is `ratio=<x>`: the largest ratio over the cases run.
"""

import argparse
import functools
import importlib
import os
import statistics
import sys
import time
import types
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)  # this checkout's bitune_jax
from bitune_jax import methods, models, queues, sharding  # noqa: E402
from bitune_jax.methods import base, optimizer  # noqa: E402
from bitune_jax.models import vit  # noqa: E402

CASES = {"r50": ("resnet50", 224, 16), "r18": ("resnet18", 112, 32),
         "vit": ("vit_s16", 224, 16)}
# Dense bf16 peak TFLOP/s by device kind (for MFU), the most specific name first: the
# first whose name is in `jax.devices()[0].device_kind` is used. "TPU v5 lite" is
# v5e, "TPU v5" (alone) v5p; "H100 PCIe" and "H100 NVL" are the slower H100s.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
               ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0),
               ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
               ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0))


class Step(NamedTuple):
  run: Callable[[], float]  # one train step (blocked on), its seconds
  flops: float  # XLA's cost_analysis of the compiled step (NaN where it gives none)
  trace: Callable[[], Any]  # the step's ClosedJaxpr at these shapes


def make_config(arch, size, batch, method, bf16, *, queue_size=32):
  """`configs/<method>.py` for CUB at 100% (C = 200) at these sizes; Bi-tuning's with
  `queue_size` (K) slots per class."""
  config = importlib.import_module(f"bitune_jax.configs.{method}").get_config(
      f"cub,{arch},100")  # a ViT's with the ViT recipe (AdamW, layer-wise decay)
  config.image_size = size
  config.batch_size, config.total_steps, config.bf16 = batch, 1000, bf16
  if method == "bituning":
    config.bituning.queue_size = queue_size
  return config


def initial_state(method, model, tx, config, mesh):
  """`(state, shardings, abstract state)` of `method` at step 0, sharded on `mesh`."""
  shape = (config.image_size, config.image_size, 3)
  data = types.SimpleNamespace(image_shape=shape)  # all a synthetic batch has
  init = functools.partial(base.init_state, method, sample_images=jnp.zeros((1,) + shape),
                           model=model, tx=tx, config=config, data=data)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = base.state_shardings(method, abstract, mesh, config)
  return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0)), shardings, abstract


def compiled_step(config):
  """`Step`: `run()` does one train step on a synthetic on-device batch."""
  method = methods.get(config.method)
  mesh = sharding.make_mesh()
  model = method.build_model(config, config.num_classes)
  tx = optimizer.make_optimizer(config)
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  state, shardings, abstract = initial_state(method, model, tx, config, mesh)
  state = [state]
  rng = np.random.default_rng(0)
  images = rng.standard_normal(shape).astype(np.float32)
  labels = rng.integers(0, config.num_classes, config.batch_size).astype(np.int32)
  host = ({"image_q": images, "image_k": images[::-1].copy(), "label": labels}
          if method.views == "two" else {"image": images, "label": labels})
  batch = sharding.global_batch(host, mesh)
  step_fn = base.make_train_step(method, model, tx, config)
  step = jax.jit(step_fn, in_shardings=(shardings, None), donate_argnums=0,
                 compiler_options=queues.inplace_update_compiler_options())
  compiled = step.lower(state[0], batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", float("nan")))

  def run():
    start = time.perf_counter()
    state[0], metrics = compiled(state[0], batch)
    jax.block_until_ready((state[0], metrics))
    return time.perf_counter() - start
  run()  # warm caches
  return Step(run, flops, lambda: jax.make_jaxpr(step_fn)(abstract, batch))


def paired_times(runs, reps):
  """Alternates the steps (ABBA order) so that a slow phase of a shared machine hits
  both; returns each step's times."""
  times = {name: [] for name in runs}
  names = list(runs)
  for i in range(reps):
    for name in (names if i % 2 == 0 else names[::-1]):
      times[name].append(runs[name]())
  return times


def peak_tflops(kind=None):
  """`(dense bf16 peak TFLOP/s or None, device kind)` of `kind` (default: device 0's)."""
  kind = kind or jax.devices()[0].device_kind
  return next((v for k, v in PEAK_TFLOPS if k in kind), None), kind


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="r50,r18")
  parser.add_argument("--reps", type=int, default=6)
  parser.add_argument("--gpu", action="store_true", help="bf16 activations, MFU")
  args = parser.parse_args()
  peak, kind = peak_tflops()
  print(f"jax {jax.__version__}, {jax.device_count()} x {kind}, "
        f"{'bf16' if args.gpu else 'float32'} activations", flush=True)
  worst = 0.0
  for name in args.cases.split(","):
    arch, size, batch = CASES[name]
    runs, flops = {}, {}
    for method in ("finetune", "bituning"):
      runs[method], flops[method], _ = compiled_step(
          make_config(arch, size, batch, method, args.gpu))
    times = paired_times(runs, args.reps)
    for method in runs:
      seconds = statistics.median(times[method])
      line = (f"{arch} {size}px batch {batch} {method:9s}: {seconds * 1e3:8.1f} ms/step "
              f"(min {min(times[method]) * 1e3:.1f})")
      if flops[method] == flops[method]:  # not NaN
        line += (f", {flops[method] / 1e9:.0f} GFLOP, "
                 f"{flops[method] / seconds / 1e12:.2f} TFLOP/s")
        if args.gpu and peak:
          line += f", MFU {flops[method] / seconds / 1e12 / peak:.1%} of {peak:.0f} TFLOP/s"
      print(line, flush=True)
    if models.is_vit(arch):
      analytic = 3 * batch * vit.flops_per_image(arch, size)  # forward + 2x backward
      print(f"{arch}: vanilla fine-tuning's step, XLA {flops['finetune'] / 1e9:.1f} GFLOP "
            f"against {analytic / 1e9:.1f} analytic (x{flops['finetune'] / analytic:.3f})",
            flush=True)
    ratio = statistics.median(
        b / f for b, f in zip(times["bituning"], times["finetune"]))
    worst = max(worst, ratio)
    print(f"{arch}: bituning / finetune = {ratio:.3f} (median of {args.reps} paired "
          f"steps; ratio of minima {min(times['bituning']) / min(times['finetune']):.3f})",
          flush=True)
  print(f"ratio={worst:.3f}")


if __name__ == "__main__":
  main()
