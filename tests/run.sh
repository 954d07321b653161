#!/usr/bin/env bash
# The README's test command, and exactly what CI runs (.ci/run calls this script):
# installs what the tests need, the pinned CPU torch first (an unpinned torch pulls
# several GB of CUDA packages), then runs the whole suite on 3 pytest-xdist workers, a
# file to each (a file's module fixtures, e.g. test_multiprocess.py's launches, run once),
# the longest files first (tests/conftest.py; --no-loadscope-reorder keeps that order).
# Much of a test's time is single-threaded (Python, XLA's compiler, process starts): on
# 2 cores, 3 workers keep both busy (measured: 22.3 min with 2 workers, 17.2 with 3,
# the same code).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test,torch]"
python3 -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder "$@"
