#!/usr/bin/env bash
# The GPU suite (issue 20, section 5): decoder train step MFU at paper width, bench-karlo-small
# sampling against diffusers, fused against plain attention. Results: $OUT/gpu_suite.json.
#
#   benchmarks/gpu_suite.sh                 # on the GPU machine (the device tool sets $OUT)
#   benchmarks/gpu_suite.sh --dry-run       # tiny sizes on any backend; CI runs this on the CPU
#   WHEELS=wheels/ benchmarks/gpu_suite.sh  # first install carried wheels (no index there)
#
# Budget: under 9 minutes on an H100/H200 (each part is timed in the JSON). The device's image has
# jax, flax, optax, orbax and torch but not ml_collections, grain, tfds or diffusers: carry
# wheels for them (pip download --only-binary :all: -d wheels ...) and set WHEELS.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu_suite}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl
  "$PY" -m pip install --quiet --no-deps -e . 2>/dev/null || true
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export UNCLIP_JAX_COMPILATION_CACHE="${UNCLIP_JAX_COMPILATION_CACHE:-off}"  # compile timed cold
if command -v nvidia-smi >/dev/null; then
  mkdir -p "$OUT" && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    > "$OUT/nvidia_smi.csv" || true
fi
exec "$PY" benchmarks/gpu_suite.py --out "$OUT" "$@"
