"""launch/gpu_speed.py's CPU smoke mode runs every part and prints the one table (no speed asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("diffusers")


@pytest.mark.slow
def test_gpu_speed_smoke_mode_writes_the_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "gpu_speed.py"), "--smoke", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "speed.json").read_text())
    assert {"unet256_eager", "unet256_cl", "sampling", "sdxl1024_bf16_ckpt", "ema"} <= results.keys()
    sdxl = results["sdxl1024_bf16_ckpt"]["models"]  # the SDXL-shaped step, ours and diffusers' side by side
    assert sdxl["ours"]["img_per_s"] > 0 and sdxl["diffusers"]["img_per_s"] > 0
    assert results["ema"]["ema_update_s"] > 0
    assert "img/s" in proc.stdout and "EMA update:" in proc.stdout
