"""Benchmark: converting a ResNet-50 checkpoint (time and peak memory).

Makes a random torchvision-style ResNet-50 checkpoint (102 MB; our PyTorch reference
model in third_party/) in both torch formats, then runs `bitune-convert` on each in a
fresh child process and reports wall time (import excluded, read + map + atomic write
included) and the child's peak resident memory above its post-import baseline.

Usage: python bench/convert.py      (needs torch, for making the checkpoint only)
Goal: under 3 s per conversion on 2 CPU cores.
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, resource, sys, time
from bitune_jax.cli import convert as convert_cli
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
code = convert_cli.main([sys.argv[1], sys.argv[2], "--arch", "resnet50"])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"code": code, "seconds": seconds, "baseline_mb": base / 1024,
                  "peak_mb": peak / 1024}))
"""


def _make_checkpoints(folder):
  sys.path.insert(0, os.path.join(ROOT, "third_party"))
  import torch  # pylint: disable=g-import-not-at-top
  import torch_models  # pylint: disable=g-import-not-at-top
  model = torch_models.resnet50()
  torch_models.randomize_(model, torch.Generator().manual_seed(0))
  paths = {}
  for fmt in ("zip", "legacy"):
    paths[fmt] = os.path.join(folder, f"resnet50_{fmt}.pth")
    torch.save(model.state_dict(), paths[fmt],
               _use_new_zipfile_serialization=(fmt == "zip"))
  return paths


def main():
  with tempfile.TemporaryDirectory() as folder:
    paths = _make_checkpoints(folder)
    size_mb = os.path.getsize(paths["zip"]) / 2**20
    print(f"ResNet-50 checkpoint: {size_mb:.0f} MB")
    worst = 0.0
    for fmt, path in paths.items():
      runs = []
      for _ in range(3):
        out = subprocess.run([sys.executable, "-c", _CHILD, path,
                              os.path.join(folder, "out.npz")],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
      best = min(runs, key=lambda r: r["seconds"])
      assert all(r["code"] == 0 for r in runs), runs
      worst = max(worst, best["seconds"])
      times = ", ".join(f"{r['seconds']:.2f}" for r in runs)
      print(f"{fmt:>6}: {best['seconds']:.2f} s (best of 3; runs {times}), peak RSS "
            f"{best['peak_mb']:.0f} MB = {best['peak_mb'] - best['baseline_mb']:.0f} MB "
            f"above the {best['baseline_mb']:.0f} MB baseline after imports")
    print(f"goal=3.0s worst={worst:.2f}s ratio={worst / 3.0:.2f}")


if __name__ == "__main__":
  main()
