"""Benchmark: the Bi-tuning head (CCE + CCL + enqueue, forward and backward).

Measures, in one run and on one machine:
  * ours: `jax.jit` of value_and_grad(CCE + CCL) w.r.t. the query features, then the
    enqueue of both key queues (queues donated, as in the train step);
  * a plain float32 matmul `[C*K, F+1] @ [F+1, B]` (the CCE's one big product), to show
    what fraction of the machine's matmul rate the head achieves;
  * the PyTorch reference head (third_party/bituning_reference.py: per-sample loops,
    every class weight scored against every slot, one-at-a-time enqueue), forward and
    backward, if torch is installed.

Usage:
  python bench/loss_head.py                   # both cases of the issue
  python bench/loss_head.py --cases small --reps 20
  python bench/loss_head.py --no-torch

FLOPs counted (multiply-add = 2): CCE forward 2*C*K*(F+1)*B; CCL forward and its
backward to z_query 2 * 2*C*K*D*B; the rest (B x F vectors, the enqueue) is negligible.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "third_party")]  # this checkout's bitune_jax
from bitune_jax import losses, queues  # noqa: E402

CASES = {"large": (1000, 32, 256, 2048, 128), "small": (200, 8, 48, 2048, 128)}


def _median_seconds(fn, reps, warmup=2):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def make_inputs(case, seed=0):
  num_classes, size, batch, feat, dim = case
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  return dict(
      h_q=rng.standard_normal((batch, feat)).astype(np.float32),
      h_k=rng.standard_normal((batch, feat)).astype(np.float32),
      z_q=unit(rng.standard_normal((batch, dim))).astype(np.float32),
      z_k=unit(rng.standard_normal((batch, dim))).astype(np.float32),
      labels=rng.integers(0, num_classes, batch).astype(np.int32),
      kernel=(0.01 * rng.standard_normal((feat, num_classes))).astype(np.float32),
      bias=np.zeros(num_classes, np.float32))


def head_step(queue_h, queue_z, batch, head):
  """CCE + CCL against the queues, gradients w.r.t. the query features, then enqueue."""
  def total(h_q, z_q):
    cce = losses.contrastive_cross_entropy_loss(
        h_query=h_q, head_kernel=head["kernel"], head_bias=head["bias"],
        queue_h=queue_h.keys, labels=batch["labels"])
    ccl = losses.categorical_contrastive_loss(
        z_query=z_q, z_key=batch["z_k"], queue_z=queue_z.keys, labels=batch["labels"])
    return cce + ccl
  loss, grads = jax.value_and_grad(total, argnums=(0, 1))(batch["h_q"], batch["z_q"])
  queue_h = queues.enqueue_by_class(
      queue_h, keys=losses.append_one_and_normalize(batch["h_k"]), labels=batch["labels"])
  queue_z = queues.enqueue_by_class(queue_z, keys=batch["z_k"], labels=batch["labels"])
  return queue_h, queue_z, loss, grads


def bench_jax(case, data, reps):
  num_classes, size, _, feat, dim = case
  rngs = jax.random.split(jax.random.PRNGKey(0))
  state = [queues.init_class_queues(rngs[0], num_classes=num_classes, size=size,
                                    dim=feat + 1),
           queues.init_class_queues(rngs[1], num_classes=num_classes, size=size, dim=dim)]
  batch = {k: jnp.asarray(data[k]) for k in ("h_q", "h_k", "z_q", "z_k", "labels")}
  head = {"kernel": jnp.asarray(data["kernel"]), "bias": jnp.asarray(data["bias"])}
  step = jax.jit(head_step, donate_argnums=(0, 1),
                 compiler_options=queues.inplace_update_compiler_options())

  def run():
    state[0], state[1], loss, grads = step(state[0], state[1], batch, head)
    jax.block_until_ready((state, loss, grads))
  return _median_seconds(run, reps)


def bench_matmul(case, reps):
  num_classes, size, batch, feat, _ = case
  a = jnp.ones((num_classes * size, feat + 1), jnp.float32)
  b = jnp.ones((feat + 1, batch), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  return _median_seconds(lambda: matmul(a, b).block_until_ready(), reps)


def bench_torch(case, data, reps):
  import bituning_reference as ref  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  num_classes, size, _, feat, dim = case
  queue_h = torch.nn.functional.normalize(torch.randn(feat + 1, num_classes * size), dim=0)
  queue_z = torch.nn.functional.normalize(torch.randn(dim, num_classes * size), dim=0)
  ptr = torch.zeros(num_classes, dtype=torch.long)
  t = {k: torch.from_numpy(v) for k, v in data.items()}
  weight, bias = t["kernel"].T.contiguous(), t["bias"]
  labels = t["labels"].long()
  k_h = torch.nn.functional.normalize(
      torch.cat([t["h_k"], torch.ones(len(labels), 1)], 1), dim=1)

  def run():
    h_q = t["h_q"].clone().requires_grad_(True)
    z_q = t["z_q"].clone().requires_grad_(True)
    ccl = ref.ccl_reference(z_q, t["z_k"], queue_z, labels, num_classes, size)
    cce = ref.cce_reference(h_q, weight, bias, queue_h, labels, num_classes, size)
    (cce + ccl).backward()
    ref.enqueue_reference(queue_h, ptr.clone(), k_h, labels, size)
    ref.enqueue_reference(queue_z, ptr, t["z_k"], labels, size)
  return _median_seconds(run, max(2, reps // 3), warmup=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="large,small")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cpu cores", flush=True)
  for name in args.cases.split(","):
    case = CASES[name]
    num_classes, size, batch, feat, dim = case
    flops = 2 * num_classes * size * batch * (feat + 1 + 2 * dim)
    mm_flops = 2 * num_classes * size * (feat + 1) * batch
    data = make_inputs(case)
    ours = bench_jax(case, data, args.reps)
    matmul = bench_matmul(case, args.reps)
    line = (f"{name} (C,K,B,F,D)={case}: ours {ours * 1e3:.1f} ms "
            f"({flops / ours / 1e9:.0f} GFLOP/s of {flops / 1e9:.1f} GFLOP) | "
            f"plain matmul {matmul * 1e3:.1f} ms ({mm_flops / matmul / 1e9:.0f} GFLOP/s)")
    if not args.no_torch:
      reference = bench_torch(case, data, args.reps)
      line += (f" | pytorch reference {reference * 1e3:.0f} ms | "
               f"speedup={reference / ours:.1f}x")
    print(line, flush=True)


if __name__ == "__main__":
  main()
