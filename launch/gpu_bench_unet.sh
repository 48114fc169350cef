#!/usr/bin/env bash
# U-Net training-step benchmark on one GPU (sized for an H200, < 8 minutes): ours vs diffusers'
# UNet2DConditionModel, Stable Diffusion 1.5's U-Net at 32x32 latents (256 px), batch 64, bf16
# autocast, fused AdamW, same weights and inputs in both (launch/bench_unet.py does the work):
#   1. bf16 matmul peak (8192^3, best of 10; measured again inside every run, MFU uses it)
#   2. eager                      ours vs diffusers
#   3. gradient checkpointing     ours vs diffusers
#   4. torch.compile + channels_last  ours vs diffusers (last: two ~150 s compiles; if the time
#      budget runs out, steps 1-3 are already written)
# Writes eager.json, gradckpt.json, compile_cl.json, bench.log and table.txt into $OUT
# (the device tool sets it; default runs/gpu_bench). Compare with the anchors in
# ../shared/anchors/h200-diffusers-sd15-2026-11-28.jsonl, beside the checkout (diffusers eager
# b64: 0.178 s/step, 30.5 GiB, 34.7 TFLOP/step; compiled: 0.125 s; grad ckpt: 0.315 s, 15.2 GiB;
# matmul 777 TFLOP/s).
#
# Run (device tool, repo root):      bash launch/gpu_bench_unet.sh            carry: ["wheels"]
# Anywhere with a GPU:               OUT=runs/gpu_bench bash launch/gpu_bench_unet.sh
# CPU smoke test of the same commands (tiny model; ~5 min on 2 cores, nearly all of it the CPU
# inductor compile of the last run):
#   BENCH_EXTRA="--device cpu --config tiny --batch 2 --res 8 --reps 2 --warmup 1" OUT=/tmp/gb bash launch/gpu_bench_unet.sh
#
# The GPU machine has no internet. Its image has python3 3.12 with torch (2.11, CUDA 13), numpy,
# pillow, pyyaml, regex, requests, filelock, safetensors 0.8, huggingface-hub 1.33, but neither
# diffusers nor pydantic. The project is NOT pip-installed there (its pyproject pins torch>=2.14 and
# training-only deps the image lacks); it runs from this checkout via PYTHONPATH. Prepare the
# missing wheels once on the dev machine (any OS; they are for the GPU box's cp312 x86-64):
#
#   echo /wheels/ >> .git/info/exclude       # keep them out of commits; name "wheels" in carry
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d wheels diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
#     typing-inspection typing-extensions
#
# (~9 MiB. diffusers' other requirements are in the image, except importlib_metadata, which it
# imports only on Python < 3.8. pydantic and its four deps are for ldm_train.config; pin
# pydantic-core to the version the pydantic wheel names:
# unzip -p wheels/pydantic-2*.whl '*/METADATA' | grep pydantic-core.)
# They are installed with --no-deps into /tmp/bench_site, ahead of the image's packages.
# Knobs: PYTHON (interpreter), BENCH_BUDGET_S (default 450), BENCH_EXTRA (appended to every run;
# argparse's last value wins, e.g. "--reps 20"), BENCH_ONLY (runs to do, default
# "eager gradckpt compile_cl"; e.g. BENCH_ONLY=compile_cl to redo only a compile run that ran out
# of budget). Device tool: timeout_s 600 leaves ~2 min beyond the 450 s budget for the wheel
# install and the summary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_bench}"
mkdir -p "$OUT"
LOG="$OUT/bench.log"
: >"$LOG"
BUDGET="${BENCH_BUDGET_S:-450}"
START=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
say() { echo "[gpu_bench_unet +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# Interpreter: $PYTHON, else the first of .venv/bin/python and python3 whose torch sees a GPU (on
# the GPU box: the image's python3), else the first that has torch at all (CPU smoke test).
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for want in "torch.cuda.is_available()" "True"; do
    for cand in .venv/bin/python python3; do
      if command -v "$cand" >/dev/null && "$cand" -c "import sys, torch; sys.exit(0 if $want else 1)" 2>/dev/null; then
        PY=$cand
        break 2
      fi
    done
  done
  PY="${PY:-python3}"
fi
say "python: $PY"

if compgen -G "wheels/*.whl" >/dev/null; then
  say "installing $(ls wheels/*.whl | wc -l) carried wheels into /tmp/bench_site (--no-index --no-deps)"
  "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links wheels --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/bench_site wheels/*.whl 2>&1 | tee -a "$LOG"
  export PYTHONPATH="/tmp/bench_site${PYTHONPATH:+:$PYTHONPATH}"
else
  say "no wheels/ folder: using what $PY already has"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # ldm_train from this checkout

"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, sys
import torch
print("python", platform.python_version(), sys.executable, "| torch", torch.__version__,
      "| cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import diffusers, pydantic, yaml  # noqa: F401
    print("diffusers", diffusers.__version__, "| pydantic", pydantic.__version__)
except ImportError as e:
    sys.exit(f"missing: {e}. pip install diffusers==0.42.1 pydantic, or carry wheels (see the top of launch/gpu_bench_unet.sh)")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { say "environment check failed"; exit 1; }

COMMON=(--config sd15 --device cuda --dtype bf16 --batch 64 --res 32)
# shellcheck disable=SC2206
EXTRA=(${BENCH_EXTRA:-})
failed=0
bench() {  # bench NAME SECONDS_AT_MOST ARGS...
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((left < cap ? left : cap))
  if [ "$limit" -lt 30 ]; then
    say "$name: skipped, ${left}s of the ${BUDGET}s budget left"
    failed=1
    return
  fi
  say "$name: $* (at most ${limit}s)"
  timeout --kill-after=10 "$limit" "$PY" launch/bench_unet.py "${COMMON[@]}" "$@" "${EXTRA[@]}" \
    --json "$OUT/$name.json" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { say "$name: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)')"; failed=1; }
}

ONLY=" ${BENCH_ONLY:-eager gradckpt compile_cl} "
want() { [[ "$ONLY" == *" $1 "* ]]; }
want eager && bench eager 120 --reps 10 --warmup 3
want gradckpt && bench gradckpt 120 --grad-ckpt --reps 10 --warmup 3
want compile_cl && bench compile_cl 600 --compile --channels-last --reps 10 --warmup 2

say "summary"
reports=()
for name in eager gradckpt compile_cl; do [ -f "$OUT/$name.json" ] && reports+=("$OUT/$name.json"); done
[ "${#reports[@]}" -gt 0 ] && "$PY" launch/bench_unet.py --report "${reports[@]}" 2>>"$LOG" \
  | tee "$OUT/table.txt" | tee -a "$LOG"
say "done in $((SECONDS - START))s; results in $OUT"
exit "$failed"
