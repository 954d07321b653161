#!/usr/bin/env bash
# The README's test command, and exactly what CI runs (.ci/run calls this script):
# installs what the tests need, the pinned CPU torch first (an unpinned torch pulls
# several GB of CUDA packages), then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test,torch]"
python3 -m pytest -q "$@"
