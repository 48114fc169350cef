#!/usr/bin/env bash
# Issue 17's speed goals on one GPU in one run (< 8 minutes on an H200; launch/gpu_speed.py does
# the work and prints the table). Installs the wheels the GPU image lacks as gpu_bench_unet.sh
# does (carry: ["wheels"]), then runs from this checkout via PYTHONPATH.
#   Device tool (repo root):  bash launch/gpu_speed.sh          timeout_s 560, carry ["wheels"]
#   CPU smoke (~2 min):       SMOKE=1 OUT=/tmp/gs bash launch/gpu_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_speed}"
mkdir -p "$OUT"
if [ -d wheels ] && [ -z "${SMOKE:-}" ]; then
  python3 -m pip install --quiet --no-index --find-links wheels --no-deps wheels/*.whl >"$OUT/pip.log" 2>&1 || true
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
PY="${PYTHON:-python3}"
exec "$PY" launch/gpu_speed.py ${SMOKE:+--smoke} --out "$OUT"
