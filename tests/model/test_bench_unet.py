"""launch/bench_unet.py runs end to end at the tiny config and compares like with like.

No assertion on speed (machines are noisy): only that both models ran, have the same size and,
with the same weights and inputs, gave the same loss on their first step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "launch" / "bench_unet.py"

pytest.importorskip("diffusers")


@pytest.mark.slow
def test_bench_unet_tiny_cpu(tmp_path):
    out = tmp_path / "tmp.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--config", "tiny", "--device", "cpu", "--reps", "2", "--warmup", "1",
         "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ratio diffusers/ours" in proc.stdout

    res = json.loads(out.read_text())
    assert set(res["models"]) == {"ours", "diffusers"}
    ours, theirs = res["models"]["ours"], res["models"]["diffusers"]
    for m in (ours, theirs):
        assert len(m["step_s"]["all"]) == 2
        assert all(t > 0 for t in m["step_s"]["all"])
        assert m["step_s"]["min"] > 0 and m["img_per_s"] > 0
        assert len(m["losses"]) == 3  # 1 warm-up + 2 timed steps
    assert ours["params"] == theirs["params"] > 0
    # Same weights, same inputs: the first step's losses agree (fp32 CPU).
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], rel=1e-5)
    assert res["ratio"]["min_paired"] <= res["ratio"]["median_paired"] <= res["ratio"]["max_paired"]
    assert len(res["ratio"]["paired"]) == 2


def test_bench_unet_help():
    proc = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--channels-last" in proc.stdout and "--grad-ckpt" in proc.stdout


@pytest.mark.slow
def test_bench_unet_takes_a_config_file(tmp_path):
    """--config FILE: the file's model section (here relative to the working directory)."""
    (tmp_path / "unet.yaml").write_text("model:\n  block_out_channels: [16, 32]\n  attention_levels: [false, true]\n"
                                        "  channels_per_head: 8\n  cross_attention_dim: 16\n  norm_num_groups: 8\n")
    out = tmp_path / "file.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--config", "unet.yaml", "--device", "cpu", "--reps", "1", "--warmup", "0",
         "--batch", "2", "--res", "8", "--context-len", "4", "--json", str(out)],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["model_config_file"] == "unet.yaml"
    assert res["model_config"]["block_out_channels"] == [16, 32] and res["model_config"]["cross_attention_dim"] == 16
    assert res["models"]["ours"]["params"] == res["models"]["diffusers"]["params"] > 0


def test_bench_unet_refuses_an_unknown_config():
    proc = subprocess.run([sys.executable, str(BENCH), "--config", "sd99"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "neither a preset (tiny, small, sd15, sdxl-tiny, sdxl) nor a config file" in proc.stderr
