"""`eval` split across 2 processes (torchrun, CPU/gloo) gives the same images and
metrics as 1 process with the same seed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import MICRO
from ldm_train.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))}


def test_two_processes_give_the_same_images_and_metrics(micro_run, tmp_path):
    common = ["--checkpoint", str(micro_run.run), "--num-samples", "5", "--steps", "3",
              "--config", str(MICRO), f"run.dir={micro_run.run}", "distributed.cpu=true"]
    assert main(["eval", "--out", str(tmp_path / "one"), *common]) == 0
    # torchrun, the standard launcher: Accelerate reads RANK/WORLD_SIZE and uses gloo on the CPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "ldm_train.cli", "eval", "--out", str(tmp_path / "two"), *common]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["val_loss"] == two["val_loss"]
    a, b = _images(tmp_path / "one"), _images(tmp_path / "two")
    assert list(a) == list(b) and len(a) == 5
    for name in a:  # same pixels (one 8-bit level of slack for batch-size-dependent float rounding)
        assert np.abs(a[name].astype(int) - b[name].astype(int)).max() <= 1, name
    assert json.loads((tmp_path / "one" / "images" / "index.json").read_text()) == json.loads(
        (tmp_path / "two" / "images" / "index.json").read_text()
    )
