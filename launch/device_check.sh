#!/usr/bin/env bash
# GPU check for the walking skeleton, sized for a 10-minute device slot:
# installs into .venv if needed, runs the test suite's fast part and the full demo on the GPU,
# and copies the summary and grids to $OUT (the device tool's result folder) when it is set.
#   bash launch/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/device_check}"
mkdir -p "$OUT"
bash launch/setup.sh install
.venv/bin/python -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"
( time .venv/bin/ldm-train demo run.dir=runs/gpu_demo --overwrite ) 2>&1 | grep -v 'it/s\]\|step/s\]\|img/s\]\|glyph/s\]' | tail -40 | tee "$OUT/demo.txt"
cp runs/gpu_demo/summary.json runs/gpu_demo/samples.png runs/gpu_demo/recon.png runs/gpu_demo/loss.png "$OUT/" || true
