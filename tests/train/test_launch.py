"""The training stage under the real `accelerate launch` launcher with the shipped config file."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import MICRO, REPO

pytestmark = pytest.mark.slow


def test_accelerate_launch_runs_train_stage(micro_run, tmp_path):
    """`accelerate launch --config_file launch/accelerate/single.yaml -m ldm_train.cli train`
    trains from the micro run's latents and writes a checkpoint and the resolved config."""
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate console script not installed next to this Python")
    run = tmp_path / "run"
    src = micro_run.cfg.path(micro_run.cfg.latents.dir)
    shutil.copytree(src, run / "latents")
    cmd = [
        str(accelerate), "launch", "--config_file", str(REPO / "launch" / "accelerate" / "single.yaml"),
        "--cpu", "-m", "ldm_train.cli", "train", "--config", str(MICRO), f"run.dir={run}", "train.steps=3",
        "distributed.mixed_precision=bf16",  # bf16 autocast on the CPU: the loop's mixed-precision path
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "step-0000003" / "ema-00000-of-00001.safetensors").is_file()
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["train"]["steps"] == 3 and written["run"]["dir"] == str(run)
    assert written["distributed"]["mixed_precision"] == "bf16"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(v) for v in losses)
