"""Test setup: 8 simulated CPU devices, so sharding is exercised on every run.

The flag must be set before JAX initialises its backends, hence at import time.
"""
import collections
import os
import resource
import secrets
import sys

_FLAG = "--xla_force_host_platform_device_count=8"
# XLA's CPU compiler set for compile speed in the tests: LLVM at -O0, which changes how
# fast the machine code runs, not the HLO it runs (the tests' numbers are held to
# independent references either way). Compiling is most of the suite's CPU time; the
# Bi-tuning demo step compiles in about 0.6 of XLA's default CPU time
# (`python bench/compile_flags.py`). The README's quick start runs without it
# (tests/test_loop.py), as users run it.
# Not XLA's older CPU fusion emitters (`--xla_cpu_use_fusion_emitters=false`), which
# compile another 40% faster and which the suite used until 2026-12-07: they round the
# same expression differently depending on the program it is compiled into. Measured
# here: FixMatch's views made inside a program that also runs the network against the
# same views compiled alone, 1 ulp apart on 3842 values of the weak view and 0.14 apart
# on 36 pixels of the strong one (a RandAugment threshold crossed). The tests rebuild a
# step's views in a program of their own (tests/fakes.py `view_batches`) to compute its
# reference, which then starts from other images (test_fixmatch.py failed: the update
# 1e-3 to 4e-2 off). Under the fusion emitters (with -O0) the two are bitwise equal.
FAST_COMPILE = ("--xla_backend_optimization_level=0",)
for flag in (_FLAG,) + FAST_COMPILE:
  if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The decoded-image caches of the runs the tests make go to a folder of this session
# (inherited by the processes the tests start), not to ~/.cache.
# Removed when the session ends, like the compilation cache below (before, every run
# left its folder in /tmp).
if not os.environ.get("BITUNE_JAX_CACHE_DIR"):
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ["BITUNE_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="bitune-test-cache-")
  atexit.register(shutil.rmtree, os.environ["BITUNE_JAX_CACHE_DIR"], True)
# XLA's compiled programs too, in a folder of this session: the suite compiles the same
# small steps again and again (each test builds its own run; each `bitune-train` process
# the tests start compiles what this process already did), and the second compilation of
# a program is a read of the first (a tiny run: 32 s -> 16 s). What runs is the same
# program either way; the folder starts empty, so CI's times are a cold start's.
# The folder is shared by processes that run at once: with a size limit set, JAX reads
# and writes it under a file lock (without one a reader can meet a half-written entry).
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  import atexit  # pylint: disable=g-import-not-at-top,reimported
  import shutil  # pylint: disable=g-import-not-at-top,reimported
  import tempfile  # pylint: disable=g-import-not-at-top,reimported
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bitune-test-xla-")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
  # (JAX's default threshold kept: programs that compile in under a second are not
  # written. Writing every one made the files of many tiny programs, test_losses and
  # test_jax_forms, 3x slower: 14 -> 48 and 25 -> 82 CPU s in a whole-suite run.)
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

# The PyTorch reference implementations used for parity live in third_party/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "third_party"))

import jax  # noqa: E402  (after the flag)
import pytest  # noqa: E402

# Helper modules whose asserts pytest explains as it does a test's.
pytest.register_assert_rewrite("fakes", "method_references", "processes")


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
  """After each file, JAX's in-memory caches (traces, compiled programs) are dropped:
  a worker that runs many files stays at the size of one (the session's compilation
  cache on disk keeps what a later file compiles again)."""
  yield
  import gc  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session", autouse=True)
def _check_devices():
  assert jax.device_count() == 8, (
      f"expected 8 simulated devices, got {jax.device_count()}; "
      "was JAX imported before tests/conftest.py set XLA_FLAGS?")


# --------------------------------------------------------------------------- seeds
# Fresh random inputs on every run, each drawn from a seed that a failure prints:
# `BITUNE_TEST_SEED=<seed> python -m pytest <test>` reruns the failing draw.
@pytest.fixture
def rng(request):
  """A NumPy generator seeded per test: `$BITUNE_TEST_SEED`, else a fresh seed."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  seed = int(os.environ.get("BITUNE_TEST_SEED") or secrets.randbits(32))
  request.node.user_properties.append(("seed", seed))
  return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  del call
  report = (yield).get_result()
  if report.when == "teardown" and hasattr(item, "cpu_start"):
    report.user_properties.append(("cpu", _cpu_spent(item)))
  seeds = [value for name, value in item.user_properties if name == "seed"]
  if report.failed and seeds:
    report.sections.append(
        ("random seed", f"seed {seeds[0]}: rerun with BITUNE_TEST_SEED={seeds[0]}"))


# --------------------------------------------------------------------------- numbers
# Tests that run a README command record what it printed here; the end of the run shows
# them with the CPU they came from (the README's numbers depend on the machine: float
# sums round differently across CPUs, and CI is another machine than the README's).
# The line travels in the test's report (a user property), so that it reaches the end of
# the run also from a pytest-xdist worker (tests/run.sh runs the suite on 2 of them).
_MEASURED = []


@pytest.fixture
def measured(request):
  """`measured("quick start: top-1 96.28")` prints that line at the end of the run."""
  return lambda line: request.node.user_properties.append(
      ("measured", f"{request.node.nodeid}: {line}"))


def pytest_runtest_logreport(report):
  if report.when == "call" and report.nodeid.endswith(QUICK_START):
    _QUICK_START["passed"] = report.passed
  if report.when == "teardown":
    _MEASURED.extend(value for name, value in report.user_properties
                     if name == "measured")
    for name, value in report.user_properties:
      if name == "cpu":
        _CPU[report.nodeid.split("::")[0]] += collections.Counter(value)
        if report.nodeid.endswith(QUICK_START) and _QUICK_START["passed"]:
          _QUICK_START.update(value)


# --------------------------------------------------------------------------- CPU
# Where the suite's CPU goes, by file: this process's XLA compilation, tracing and
# lowering (JAX's own duration events: their seconds as they passed, one thread's work
# each, so close to its CPU), the rest of its CPU, and the CPU of the
# processes the tests started, printed at the end of the run. Compiling is most of it:
# what makes the suite faster is fewer distinct programs, not fewer steps.
_COMPILE_EVENTS = {"/jax/core/compile/backend_compile_duration": "compile",
                   "/jax/core/compile/jaxpr_trace_duration": "trace",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower"}
_SECONDS = collections.Counter()
_CPU = collections.defaultdict(collections.Counter)
# The README's quick start, run as a user runs it, is the same work at every code: its
# CPU measures the machine, and the suite's CPU counted in quick starts measures the
# suite apart from the machine (the machine of 2026-12-07 takes about twice the CPU of
# the one before it for the same quick start). Printed when that test passed.
QUICK_START = "tests/test_loop.py::test_command_line_quick_start"
_QUICK_START = collections.Counter()


def _on_duration(event, seconds, **_):
  if event in _COMPILE_EVENTS:
    _SECONDS[_COMPILE_EVENTS[event]] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def _cpu_seconds():
  own, children = (resource.getrusage(who) for who in
                   (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del nextitem
  item.cpu_start = (dict(_SECONDS),) + _cpu_seconds()
  yield


def _cpu_spent(item):
  """What the test spent since it started (setup, call, teardown): `{compile, trace,
  lower, own, processes}` seconds."""
  before, own, children = item.cpu_start
  own2, children2 = _cpu_seconds()
  spent = {k: _SECONDS[k] - before.get(k, 0.0) for k in _COMPILE_EVENTS.values()}
  spent.update(own=own2 - own, processes=children2 - children)
  return spent


def _cpu():
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return "unknown CPU"
  names = [l.split(":", 1)[1].strip() for l in text.splitlines()
           if l.startswith("model name")]
  if not names:
    return "unknown CPU"
  return f"{names[0]} x {len(names)}, {'with' if ' avx512f' in text else 'no'} AVX-512"


def _cpu_table(write, top=12):
  """CPU seconds by file, the `top` costliest and the whole run."""
  total = sum(_CPU.values(), collections.Counter())
  write(f"{'file':34s} {'all':>7s} {'compile':>8s} {'trace':>6s} {'lower':>6s} "
        f"{'other':>6s} {'processes':>9s}")
  rows = sorted(_CPU.items(), key=lambda kv: -(kv[1]["own"] + kv[1]["processes"]))
  for name, c in rows[:top] + [("all tests", total)]:
    other = c["own"] - c["compile"] - c["trace"] - c["lower"]
    write(f"{os.path.basename(name)[:34]:34s} {c['own'] + c['processes']:7.0f} "
          f"{c['compile']:8.0f} {c['trace']:6.0f} {c['lower']:6.0f} {other:6.0f} "
          f"{c['processes']:9.0f}")
  quick_start = _QUICK_START["own"] + _QUICK_START["processes"]
  if quick_start > 0:
    all_tests = total["own"] + total["processes"]
    write(f"all tests in quick starts (the quick-start test's CPU, the same work at every "
          f"code): {all_tests:.0f} / {quick_start:.0f} = {all_tests / quick_start:.1f}")


def pytest_terminal_summary(terminalreporter):
  if _CPU:
    terminalreporter.section("CPU seconds by test file: XLA's compile, trace and lower "
                             "in the test processes, the rest, the processes started")
    _cpu_table(terminalreporter.write_line)
  if _MEASURED:
    terminalreporter.section(f"README numbers measured on this machine ({_cpu()})")
    for line in _MEASURED:
      terminalreporter.write_line(line)


# --------------------------------------------------------------------------- order
# The longest files, longest first (seconds of one worker in a whole run, 3 workers on
# this 2-core machine): pytest-xdist hands a worker its next file in this order
# (tests/run.sh passes --no-loadscope-reorder; by default xdist orders the files by
# their number of tests), so a long file never starts last and runs alone at the end.
_LONGEST_FIRST = (  # the whole run of 2026-12-07
    "test_multiprocess.py",  # 1089 s
    "test_bituning.py",  # 854
    "test_loop.py",  # 821 (the README's quick start: 601)
    "test_sweep.py",  # 409
    "test_unsup_finetune.py",  # 245
    "test_convert.py",  # 240
    "test_bench_device.py",  # 238
    "test_vit_methods.py",  # 224
    "test_cli_eval.py",  # 192
    "test_pipeline.py",  # 184
    "test_fixmatch.py",  # 169
    "test_baselines.py",  # 158
    "test_delta.py",  # 141
)


def pytest_collection_modifyitems(items):
  """The longest files first (`_LONGEST_FIRST`), then the others in their own order;
  each file's tests in their own order."""
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
