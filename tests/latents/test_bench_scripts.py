"""launch/bench_encode.py and launch/bench_loader.py run end to end at tiny sizes and report
their fields. No assertion on speed (machines are noisy), only that the numbers exist and are
positive."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def bench(tmp_path, script, *args):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / script), *args, "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_bench_encode_tiny(tmp_path):
    stdout, res = bench(tmp_path, "bench_encode.py", "--n", "24", "--batch", "8", "--shard-size", "10", "--res", "32")
    assert "ratio full / vae only" in stdout and "full encode" in stdout
    for key in ("vae_only_img_per_s", "text_only_img_per_s", "full_encode_img_per_s", "ratio_full_to_vae"):
        assert res[key] > 0, key
    assert res["n"] == 24 and res["res"] == 32
    assert res["ratio_full_to_bare"] > 0 and "ratio full / bare vae + text" in stdout


def test_bench_encode_sd15_mode(tmp_path):
    """SD 1.5's VAE and CLIP ViT-L/14 text tower at their real sizes, random init (about 20 s)."""
    stdout, res = bench(tmp_path, "bench_encode.py", "--sd15", "--n", "8", "--batch", "8", "--shard-size", "8", "--res", "32")
    assert res["vae"] == "sd" and res["text"].startswith("sd15 (transformers-clip-text-w768-l12of12")
    assert 123e6 < res["text_params"] < 124e6  # CLIP ViT-L/14's text tower
    for key in ("vae_only_img_per_s", "text_only_img_per_s", "bare_img_per_s", "full_encode_img_per_s", "ratio_full_to_bare"):
        assert res[key] > 0, key


def test_bench_loader_tiny(tmp_path):
    stdout, res = bench(tmp_path, "bench_loader.py", "--configs", "tiny", "--workers", "0,1", "--samples", "64",
                        "--shard-size", "16", "--seconds", "0.3", "--steps", "1", "--tiny-batch", "4")
    assert "needed/s" in stdout and "ratio" in stdout
    tiny = res["configs"]["tiny"]
    assert tiny["steps_per_s"] > 0 and tiny["needed_samples_per_s"] == pytest.approx(4 * tiny["steps_per_s"])
    assert set(tiny["loader"]) == {"0", "1"}
    for row in tiny["loader"].values():
        assert row["samples_per_s"] > 0 and row["per_worker"] > 0 and row["ratio_to_needed"] > 0
