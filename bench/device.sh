#!/usr/bin/env bash
# The accelerator check, in one command, for a machine with one GPU (or a TPU VM) and no
# network: installs the project offline, runs the README's quick start, then measures
# ResNet-50 at 224 px, batch 48 per device, bf16 (bench/device.py says what and how)
# and writes everything into one JSON file. Under 8 minutes on one H100.
#
#   bash bench/device.sh [--dry_run] [--out FILE] [--wheels DIR] [--peak_tflops X]
#                        [--skip PHASE,...] [--no_install]
#
#   --out FILE        the JSON (default: $OUT/device_bench.json if $OUT is set, else
#                     ./device_bench.json)
#   --wheels DIR      wheels to install from, offline (default: $BITUNE_WHEELS, else
#                     .whl/ in the checkout, if it exists); see the README
#   --peak_tflops X   the peak for MFU (default: from the device kind, bench/step.py)
#   --skip a,b        phases not to run (probe, quickstart, step_<method>, head,
#                     views_reference, views_moco, host)
#   --no_install      run from the checkout as it is (PYTHONPATH), installing nothing
#   --dry_run         tiny sizes, nothing installed: the CPU check the test suite runs
set -uo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.."
root=$(pwd)

out=""; wheels="${BITUNE_WHEELS:-}"; dry_run=0; no_install=0; extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1; extra+=(--dry_run) ;;
    --no_install) no_install=1 ;;
    --out) out="$2"; shift ;;
    --wheels) wheels="$2"; shift ;;
    --peak_tflops|--skip) extra+=("$1" "$2"); shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "device.sh: unknown argument '$1'; see bash bench/device.sh --help" >&2
       exit 2 ;;
  esac
  shift
done
if [ -z "$out" ]; then
  if [ -n "${OUT:-}" ]; then out="$OUT/device_bench.json"; else out="$root/device_bench.json"; fi
fi
if [ -z "$wheels" ] && [ -d "$root/.whl" ]; then wheels="$root/.whl"; fi
if [ -n "$wheels" ] && [ ! -d "$wheels" ]; then
  echo "device.sh: --wheels $wheels is not a folder; give the folder of .whl files" >&2
  exit 2
fi
py=python3
say() { echo "[device.sh] $*"; }

# ---------------------------------------------------------------------------- install
# Offline: pip never reaches an index. Wheels (if any) go in first, resolved against
# what is installed and the folder only; then the project itself, editable, without
# its dependencies; whatever happens, the checkout is first on PYTHONPATH, so the code
# measured is this checkout's.
accelerator() {  # prints jax's backend, or "none" if jax does not import
  timeout 60 $py -c "import jax; print(jax.default_backend())" 2>/dev/null | tail -1 \
    || echo none
}
install=""
if [ "$dry_run" = 1 ] || [ "$no_install" = 1 ]; then
  why=$([ "$dry_run" = 1 ] && echo dry run || echo --no_install)
  install="nothing installed ($why): the checkout on PYTHONPATH"
else
  backend=$(accelerator)
  say "jax backend before install: ${backend:-none}"
  if [ -n "$wheels" ]; then
    say "installing the wheels in $wheels (pip --no-index)"
    if timeout 120 $py -m pip install -q --no-index --find-links "$wheels" "$wheels"/*.whl; then
      install="wheels from $wheels (pip --no-index --find-links)"
    elif timeout 120 $py -m pip install -q --no-index --no-deps "$wheels"/*.whl; then
      install="wheels from $wheels, --no-deps (their dependencies did not resolve offline)"
    else
      install="the wheels in $wheels did not install"
    fi
  elif [ "$backend" = none ] || [ "$backend" = cpu ]; then
    install="no wheels given and jax sees no accelerator (backend: $backend)"
  else
    install="jax already there ($backend); no wheels"
  fi
  if timeout 120 $py -m pip install -q --no-index --no-deps --no-build-isolation -e "$root" \
      >/tmp/bitune-device-pip.log 2>&1; then
    install="$install; pip install -e . --no-deps; the checkout on PYTHONPATH"
  else
    log=/tmp/bitune-device-pip.log
    why=$( (grep -m1 "configuration error" $log || grep -m1 -i "error" $log) | sed "s/^ *//")
    install="$install; pip install -e . failed (${why:-see $log}; an old setuptools? the"
    install="$install build needs setuptools>=77: add its wheel); the checkout on PYTHONPATH"
  fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
say "install: $install"
package=$($py -c 'import bitune_jax, os; print(os.path.dirname(bitune_jax.__file__))' 2>&1)
say "jax backend: $(accelerator); bitune_jax from $(echo "$package" | tail -1)"

# ---------------------------------------------------------------------------- measure
# --started counts the install in bench/device.py's budget for the whole check.
$py "$root/bench/device.py" --out "$out" --started "$started" --install "$install" \
  ${extra[@]+"${extra[@]}"}
