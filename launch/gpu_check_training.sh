#!/usr/bin/env bash
# GPU checks of the data, training and evaluation issues in one prepared run (sized for one
# H200 and a 10-minute device slot; each step is capped so the later ones still run):
#   1. training: Stable Diffusion 1.5's U-Net, one GPU, DeepSpeed ZeRO-2, bf16, batch 32 at 32x32
#      latents: img/s and MFU (launch/bench_strategies.py), against launch/bench_unet.py's step
#   2. evaluation: 50-step DDIM with guidance, SD-1.5 U-Net + SD VAE decode, 512 px, batch 16,
#      img/s against the anchor 3.37 img/s (launch/bench_sampling.py)
#   3. data: encode img/s against the VAE's own encode at 256 px (launch/bench_encode.py) and the
#      latent loader against the SD-1.5 step rate (launch/bench_loader.py)
# Results (JSON + log) go to $OUT (the device tool sets it; default runs/gpu_check_training).
#
# The GPU box has no internet and its image lacks diffusers, pydantic, accelerate, deepspeed and
# webdataset: carry them as wheels (see launch/gpu_bench_unet.sh for the pip download command; add
# accelerate, deepspeed (`pip wheel --no-deps deepspeed` builds a pure-Python wheel), webdataset,
# braceexpand, open-clip-torch, ftfy, psutil, py-cpuinfo, hjson, ninja, msgpack to its list).
# Device tool: bash launch/gpu_check_training.sh   carry: ["wheels"]   timeout_s: 600
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check_training}"
mkdir -p "$OUT"
LOG="$OUT/check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=4
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && PY=.venv/bin/python
if compgen -G "wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/check_site wheels/*.whl 2>&1 | tee -a "$LOG"
  export PYTHONPATH="/tmp/check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"

step() {  # step NAME SECONDS_AT_MOST COMMAND...
  local name=$1 cap=$2
  shift 2
  echo "== $name (at most ${cap}s): $*" | tee -a "$LOG"
  timeout "$cap" "$@" 2>&1 | grep -v 'it/s\]\|step/s\]' | tail -30 | tee -a "$LOG"
}
step train-zero2 200 "$PY" launch/bench_strategies.py --configs sd15 --strategies zero2 --nproc 1 --dtype bf16 \
  --batch 32 --steps 15 --warmup 3 --json "$OUT/train_zero2.json"
step sampling 120 "$PY" launch/bench_sampling.py --config sd15 --device cuda --dtype bf16 --batch 16 --steps 50 \
  --reps 1 --json "$OUT/sampling.json"
step encode 90 "$PY" launch/bench_encode.py --device cuda --vae sd --res 256 --n 2048 --batch 64 --dtype bf16 \
  --json "$OUT/encode.json"
step loader 90 "$PY" launch/bench_loader.py --device cuda --workers 0,4,8 --sd15-batch 32 --sd15-steps 5 \
  --sd15-warmup 2 --json "$OUT/loader.json"
echo "done; results in $OUT" | tee -a "$LOG"
