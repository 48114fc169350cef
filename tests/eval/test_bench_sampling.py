"""launch/bench_sampling.py runs the project's DDIM + guidance + decode path and reports rates."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_bench_sampling_reports_rates_against_the_anchor(tmp_path):
    out = tmp_path / "row.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "bench_sampling.py"), "--steps", "3", "--reps", "1", "--batch", "2",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["steps"] == 3 and row["unet_evals_per_image"] == 6
    assert row["sampling_img_per_s"] > row["with_decode_img_per_s"] > 0
    assert 0 < row["decode_share"] < 1
    assert row["ratio_to_anchor"] == round(row["with_decode_img_per_s"] / 3.37, 3)
    assert "not comparable" in proc.stdout  # tiny on CPU is not the anchor's setting
