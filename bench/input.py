"""Benchmark: the input path, host side and device side, against the train step it feeds,
measured in one run.

The path is the real one (`bitune_jax.data`): synthetic photo-like JPEGs of 500x375 (the
size of a CUB image) are decoded and resized once into the uint8 cache (`data.cache`, S
= 256 for the reference views at 224, `views.augment.moco_side(224)` = 384 for MoCo v2);
then, per step, the host only gathers its rows of the global batch from the memory-mapped
cache and puts them on the devices (`pipeline.train_stream`, `sharding.global_batch`),
and the two views of each example are made inside the jitted Bi-tuning step
(`views.batch.make_views`).

Printed, for each view kind ('reference': the papers' fine-tuning views; 'moco': MoCo v2's,
for unsupervised fine-tuning):
* the cache build rate (images/s, all cores; once per dataset);
* host: two-view examples/s on one core in steady state (gather + device put);
* device: the views' share of the Bi-tuning step that makes them: the views compiled
  alone over the full step with views (ResNet-18, 112 px, batch 32 on CPU; with `--gpu`
  ResNet-50, 224 px, bf16, `--gpu_batch`).

  python bench/input.py              # CPU
  python bench/input.py --gpu        # on a GPU machine

The last line is `host_per_core=<examples/s> device_share=<fraction>`, the worse of the
two view kinds. Goals: at least 2,000 examples/s per host core, at most 3% of the step.
"""

import argparse
import os
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step as step_bench  # noqa: E402  pylint: disable=g-import-not-at-top

from bitune_jax import methods, queues, sharding  # noqa: E402
from bitune_jax.data import cache, pipeline  # noqa: E402
from bitune_jax.data.views import augment, crop  # noqa: E402
from bitune_jax.data.views.batch import ViewSpec, make_views  # noqa: E402
from bitune_jax.methods import base, optimizer  # noqa: E402


def photos(count, seed=0, size=(375, 500)):
  """Encoded JPEGs (quality 90) of smooth random colour fields with fine texture."""
  import io  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    coarse = Image.fromarray(rng.uniform(0, 255, (12, 16, 3)).astype(np.uint8))
    image = np.asarray(coarse.resize(size[::-1], Image.BICUBIC), np.float32)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    out.append(buffer.getvalue())
  return out


def build_cache(encoded, side, directory, size=224):
  start = time.perf_counter()
  c = cache.load({"bench": "input", "n": len(encoded)}, encoded, side=side,
                 directory=directory, name=f"bench-{side}")
  rate = len(encoded) / (time.perf_counter() - start)
  return pipeline.Split(c.images, c.hw, np.zeros(len(c), np.int32), size), rate


def host_rate(pool, *, batch, seconds, mesh, threads=1):
  """Two-view examples/s of this host's work on `threads` threads (one per core: each
  its own stream, with its own seed): the rows of a step gathered from the
  memory-mapped cache and put on the devices."""
  start = [0.0]
  ready = threading.Barrier(threads + 1)
  counts = [0] * threads

  def work(index):
    stream = pipeline.train_stream(pool, start_step=0, batch_size=batch, seed=index,
                                   process_count=1, process_index=0)
    for _ in range(3):  # warm up: page cache, allocator
      jax.block_until_ready(sharding.global_batch(next(stream), mesh))
    ready.wait()
    while time.perf_counter() - start[0] < seconds:
      jax.block_until_ready(sharding.global_batch(next(stream), mesh))
      counts[index] += batch

  workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
  start[0] = time.perf_counter()  # (a worker past the barrier first reads a valid start)
  for worker in workers:
    worker.start()
  ready.wait()  # every worker warmed up
  start[0] = time.perf_counter()
  for worker in workers:
    worker.join()
  return sum(counts) / (time.perf_counter() - start[0])


def _timer(fn, *args):
  def run():
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start
  run()
  return run


def views_input(kind, *, size, batch, num_classes, mesh):
  """`(data, views)`: a global batch as the host puts it on the devices (uint8 cache
  images of `kind`'s side, original sizes, labels) and the two-view function that the
  step makes its views with, `views(data, step)`."""
  side = (augment.moco_side(size) if kind == "moco" else crop.eval_resize(size))
  rng = np.random.default_rng(0)
  host = {"image_u8": rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8),
          "hw": np.tile([375, 500], (batch, 1)).astype(np.int32),
          "label": rng.integers(0, num_classes, batch).astype(np.int32)}
  views = make_views(ViewSpec(kind=kind, size=size, seed=0, two_views=True))
  return sharding.global_batch(host, mesh), views


def views_alone(data, views):
  """A timer (`run() -> seconds`, warmed up) of the views alone, jitted on the device."""
  return _timer(jax.jit(views), data, jnp.int32(3))


def device_share(kind, *, arch, size, batch, bf16, reps):
  """`(views seconds, step-with-views seconds)`: medians of paired timings."""
  config = step_bench.make_config(arch, size, batch, "bituning", bf16)
  config.data.views = kind
  method = methods.get("bituning")
  mesh = sharding.make_mesh()
  model = method.build_model(config, config.num_classes)
  tx = optimizer.make_optimizer(config)
  state, shardings, _ = step_bench.initial_state(method, model, tx, config, mesh)
  state = [state]
  data, views = views_input(kind, size=size, batch=batch, num_classes=config.num_classes,
                            mesh=mesh)
  step = jax.jit(base.with_views(base.make_train_step(method, model, tx, config), views),
                 in_shardings=(shardings, None), donate_argnums=0,
                 compiler_options=queues.inplace_update_compiler_options())
  compiled = step.lower(state[0], data).compile()

  def full():
    start = time.perf_counter()
    state[0], metrics = compiled(state[0], data)
    jax.block_until_ready((state[0], metrics))
    return time.perf_counter() - start

  full()
  alone = views_alone(data, views)
  times = step_bench.paired_times({"views": alone, "full": full}, reps)
  return float(np.median(times["views"])), float(np.median(times["full"]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gpu", action="store_true",
                      help="ResNet-50, 224 px, bf16 on the accelerator")
  parser.add_argument("--gpu_batch", type=int, default=256)
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--batch", type=int, default=48, help="host batch (rows per step)")
  parser.add_argument("--seconds", type=float, default=5.0)
  parser.add_argument("--reps", type=int, default=6)
  args = parser.parse_args()
  mesh = sharding.make_mesh()
  arch, size, batch = (("resnet50", 224, args.gpu_batch) if args.gpu else
                       ("resnet18", 112, 32))
  encoded = photos(args.images)
  print(f"{len(encoded)} JPEGs of 500x375, {np.mean([len(e) for e in encoded]) / 1e3:.0f} "
        f"kB on average; {os.cpu_count()} CPU cores; {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)", flush=True)
  host, share = {}, {}
  with tempfile.TemporaryDirectory() as directory:
    for kind, side in (("reference", crop.eval_resize(224)),
                       ("moco", augment.moco_side(224))):
      pool, built = build_cache(encoded, side, directory)
      host[kind] = host_rate(pool, batch=args.batch, seconds=args.seconds, mesh=mesh)
      views, full = device_share(kind, arch=arch, size=size, batch=batch, bf16=args.gpu,
                                 reps=args.reps)
      share[kind] = views / full
      print(f"{kind:9s} views: cache {side}x{side} built at {built:6.0f} images/s; host "
            f"{host[kind]:8.0f} two-view examples/s on one core; device: views "
            f"{views * 1e3:7.2f} ms of a {full * 1e3:8.1f} ms {arch} {size}px batch "
            f"{batch} Bi-tuning step = {100 * share[kind]:.1f}%", flush=True)
  print(f"host_per_core={min(host.values()):.0f} device_share={max(share.values()):.4f}")


if __name__ == "__main__":
  main()
