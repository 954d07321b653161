"""bench/device.sh, the accelerator check: its dry run end to end on the CPU (every
phase in its own process, one JSON with every field, each number finite and of its
kind), its FLOP count against hand counts, its peak table, and its bad arguments."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import device_phases  # noqa: E402  pylint: disable=g-import-not-at-top
import step as step_bench  # noqa: E402  pylint: disable=g-import-not-at-top
import processes  # noqa: E402  pylint: disable=g-import-not-at-top

METHODS = ("finetune", "bituning", "cotuning", "unsup_finetune")


def _dry_run(tmp_path, *args, timeout):
  """The report of `bash bench/device.sh --dry_run ARGS` and its printed output."""
  env = processes.environment(1)  # one CPU device, as one GPU (not the suite's 8)
  out = tmp_path / "device_bench.json"
  proc = subprocess.run(["bash", "bench/device.sh", "--dry_run", "--out", str(out), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  with open(out) as f:
    return json.load(f), proc.stdout


def _positive(section, *keys):
  for key in keys:
    value = section[key]
    assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
    assert math.isfinite(value) and value > 0, (key, value)


def _fraction(section, key, *, closed):
  value = section[key]
  _positive(section, key)
  assert value <= 1 if closed else value < 1, (key, value)


@pytest.fixture(scope="module")
def every_phase(tmp_path_factory):
  """One dry run of every phase, the quick start included: (report, printed)."""
  return _dry_run(tmp_path_factory.mktemp("every_phase"), timeout=460)


@pytest.mark.slow
def test_dry_run_measures_every_phase(every_phase):
  report, printed = every_phase
  assert report["dry_run"] and report["problems"] == []
  device = report["device"]
  assert device["platform"] == "cpu" and device["count"] == 1
  _positive(device, "peak_tflops", "cpu_cores")
  batch = report["setup"]["batch_per_device"] * device["count"]
  steps = report["steps"]
  assert set(steps) == set(METHODS)
  for method in METHODS:
    s = steps[method]
    assert "error" not in s, (method, s)
    _positive(s, "step_ms", "step_ms_min", "model_gflop_per_step", "tflop_per_s")
    _fraction(s, "mfu", closed=True)
    assert s["global_batch"] == batch and s["step_ms_min"] <= s["step_ms"]
    np.testing.assert_allclose(s["tflop_per_s"],
                               s["model_gflop_per_step"] / s["step_ms"], rtol=1e-6)
    np.testing.assert_allclose(
        s["mfu"], s["tflop_per_s"] / (device["peak_tflops"] * device["count"]), rtol=1e-6)
  flops = {m: steps[m]["model_gflop_per_step"] for m in METHODS}
  # Bi-tuning adds the key encoder's forward (a third of a step); unsupervised
  # fine-tuning also doubles the queries (CutMix-mixed ones beside them).
  assert 1.2 < flops["bituning"] / flops["finetune"] < 1.5
  assert 2.1 < flops["unsup_finetune"] / flops["finetune"] < 2.5
  parts = [(report["bituning_head"], "head_ms", "bituning")] + [
      (report["device_views"][k], "views_ms", m)
      for k, m in (("reference", "bituning"), ("moco", "unsup_finetune"))]
  for part, key, method in parts:
    assert "error" not in part, part
    _positive(part, key)
    _fraction(part, "share", closed=False)
    assert part["step_ms"] == steps[method]["step_ms"]
    np.testing.assert_allclose(part["share"], part[key] / part["step_ms"], rtol=1e-6)
  host = report["host_input"]
  assert host["threads"] == os.cpu_count()
  for kind in ("reference", "moco"):
    _positive(host[kind], "examples_per_s_all_cores", "examples_per_s_one_core")
  assert report["seconds_total"] < 460
  assert "=== accelerator check (dry run) ===" in printed and "problems: 0" in printed


@pytest.mark.slow
def test_dry_run_quickstart(every_phase):
  quickstart = every_phase[0]["quickstart"]
  assert "error" not in quickstart, quickstart
  _positive(quickstart, "seconds")
  _fraction(quickstart, "top1", closed=True)
  _fraction(quickstart, "mean_class_acc", closed=True)
  assert quickstart["steps"] == 2


def test_skipped_phases_are_problems_and_what_needs_them_says_so(tmp_path):
  """Every phase but the probe and the head skipped: each is a problem of its own, and
  the head, which runs without the step it is a share of, says which step it lacked."""
  skip = ["quickstart"] + [f"step_{m}" for m in METHODS] + [
      "views_reference", "views_moco", "host"]
  report, printed = _dry_run(tmp_path, "--skip", ",".join(skip), timeout=200)
  skipped = "skipped (--skip)"
  assert report["problems"] == (
      [f"quickstart: {skipped}"] + [f"steps.{m}: {skipped}" for m in METHODS]
      + ["bituning_head: no bituning step time (step_bituning: skipped (--skip))"]
      + [f"device_views.{k}: {skipped}" for k in ("reference", "moco")]
      + [f"host_input: {skipped}"]), report["problems"]
  assert "error" not in report["device"]  # the probe ran
  assert "problems: 9" in printed


@pytest.mark.parametrize("args,says", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--wheels", "/nonexistent"], "is not a folder"),
    (["--skip", "nonsense"], "unknown phase(s) in --skip: nonsense")])
def test_bad_arguments_one_line_exit_2(tmp_path, args, says):
  proc = subprocess.run(["bash", "bench/device.sh", "--dry_run", "--out",
                         str(tmp_path / "x.json"), *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=60, check=False)
  assert proc.returncode == 2, proc.stderr
  assert says in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "x.json").exists()


def test_flops_count_matches_hand_counts(rng):
  b, h, w, c, k, f = (int(v) for v in rng.integers(2, 9, size=6))
  x = jnp.zeros((b, h, w, c))
  kernel = jnp.zeros((3, 3, c, f))
  dense = jnp.zeros((f, k))

  def forward(x, kernel, dense):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.mean(y, axis=(1, 2)) @ dense)

  conv, matmul = 2 * b * h * w * f * 9 * c, 2 * b * f * k
  assert device_phases.jaxpr_flops(jax.make_jaxpr(forward)(x, kernel, dense)) == (
      conv + matmul)
  # The backward pass: the gradients of the kernels (and of the conv's input, which
  # flows from the matmul) cost 2x the forward: the usual 3x in all.
  grad = jax.make_jaxpr(jax.grad(forward, argnums=(0, 1, 2)))(x, kernel, dense)
  assert device_phases.jaxpr_flops(grad) == 3 * (conv + matmul)
  # Under a scan: the body times its length.
  scanned = jax.make_jaxpr(lambda x: jax.lax.scan(
      lambda carry, _: (carry, forward(x, kernel, dense)), 0.0, None, length=5))(x)
  assert device_phases.jaxpr_flops(scanned) == 5 * (conv + matmul)


def test_flops_of_resnet50_forward_is_the_known_4_1_gmac():
  from bitune_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_backbone("resnet50")
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape),
                                                train=False))
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  # 4.09 GMACs: the convolutions of torchvision's ResNet-50 (no classifier here).
  assert abs(device_phases.jaxpr_flops(jaxpr) / 2e9 - 4.09) < 0.01


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0), ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("cpu", None)])
def test_peak_by_device_kind(kind, peak):
  assert step_bench.peak_tflops(kind) == (peak, kind)
