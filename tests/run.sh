#!/usr/bin/env bash
# The README's test command, and exactly what CI runs (.ci/run calls this script):
# installs what the tests need, the pinned CPU torch first (an unpinned torch pulls
# several GB of CUDA packages), then runs the whole suite on 2 pytest-xdist workers, a
# file to each (a file's module fixtures, e.g. test_multiprocess.py's launches, run once),
# the longest files first (tests/conftest.py; --no-loadscope-reorder keeps that order).
# Workers for this project's 2-core machine, measured on the same code each time: on the
# AMD EPYC of 2026-12-07, 24.9 min and 2836 CPU s with 2 workers, 28.7 min and 3282 CPU s
# with 3 (a third worker's programs and processes crowd the other two's: the same tests
# cost 16% more CPU); on an earlier machine, at an earlier code, 3 had won (17.2 min
# against 22.3).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test,torch]"
python3 -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
