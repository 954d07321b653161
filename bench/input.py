"""Benchmark: the two-view 224 input pipeline per CPU core against what the train step
consumes, measured in one run.

The pipeline is the real one (`bitune_jax.data.pipeline.train_stream`): encoded JPEGs in
memory (synthetic 500x375 photos-like images, the size of a CUB image), decoded and
augmented twice per example (query and key views) in tf.data, batched. It runs once
with one tf.data thread (images per second per core) and once with all cores, for the
reference views (Bi-tuning) and the MoCo v2 views (unsupervised fine-tuning: colour
jitter, grayscale, blur). The train step is the real jitted Bi-tuning step on this
machine's devices (`bench/step.py`), fed a synthetic on-device batch.

  python bench/input.py                        # ResNet-50 step, batch 16
  python bench/input.py --arch resnet18 --batch 32 --seconds 10

The last line is `ratio=<x>`: pipeline images/s on all cores over step images/s.
For an accelerator, divide its step's images/s (bench/step.py --gpu) by the per-core
rate printed here: that many host cores keep it fed.
"""

import argparse
import os
import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step as step_bench  # noqa: E402  pylint: disable=g-import-not-at-top

from bitune_jax.data import pipeline  # noqa: E402


def _photos(count, seed=0, size=(375, 500)):
  """Encoded JPEGs (quality 90) of smooth random colour fields with fine texture."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    coarse = rng.uniform(0, 255, (12, 16, 3)).astype(np.float32)
    image = tf.image.resize(coarse[None], size, method="bicubic")[0].numpy()
    image += rng.normal(0, 12, image.shape)
    out.append(tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8),
                                 quality=90).numpy())
  return np.array(out, dtype=object)


def pipeline_rate(encoded, *, kind, threads, batch, seconds, size=224):
  """Examples (two views each) per second of the training stream."""
  pool = pipeline.EncodedSplit(encoded, np.zeros(len(encoded), np.int32), len(encoded),
                               len(encoded), size)
  stream = pipeline.train_stream(pool, start_step=0, batch_size=batch, seed=0,
                                 view=pipeline.view_fn(kind, size=size), threads=threads)
  for _ in range(3):  # warm up (tracing, thread pools)
    next(stream)
  start, count = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    count += len(next(stream)["label"])
  return count / (time.perf_counter() - start)


def step_rate(arch, size, batch, reps):
  run, _ = step_bench._compiled_step(  # pylint: disable=protected-access
      step_bench._config(arch, size, batch, "bituning", False))  # pylint: disable=protected-access
  times = sorted(run() for _ in range(reps))
  return batch / times[len(times) // 2]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="resnet50")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--seconds", type=float, default=15.0)
  parser.add_argument("--images", type=int, default=256)
  args = parser.parse_args()
  cores = os.cpu_count()
  encoded = _photos(args.images)
  print(f"{len(encoded)} JPEGs of 500x375, {np.mean([len(e) for e in encoded]) / 1e3:.0f} "
        f"kB on average; {cores} CPU cores; tensorflow {tf.__version__}", flush=True)
  rates = {}
  for kind in ("reference", "moco"):
    for threads in (1, cores):
      rates[kind, threads] = pipeline_rate(encoded, kind=kind, threads=threads,
                                           batch=48, seconds=args.seconds)
      print(f"{kind:9s} views, {threads} thread(s): {rates[kind, threads]:7.1f} "
            f"examples/s (two 224 views each), "
            f"{rates[kind, threads] / threads:6.1f} per core", flush=True)
  consumed = step_rate(args.arch, 224, args.batch, args.reps)
  print(f"Bi-tuning step, {args.arch} 224px batch {args.batch}: {consumed:.2f} examples/s "
        f"on this machine's devices", flush=True)
  ratio = rates["reference", cores] / consumed
  print(f"reference pipeline on {cores} cores / step: {ratio:.1f}x; MoCo views: "
        f"{rates['moco', cores] / consumed:.1f}x; per core, reference "
        f"{rates['reference', 1]:.1f}/s, MoCo {rates['moco', 1]:.1f}/s")
  print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
  main()
