"""The strategy benchmark runs end to end (tiny sizes; the figures themselves are for the notes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_bench_strategies_reports_rates_and_ema_share(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "bench_strategies.py"), "--configs", "tiny", "--strategies", "ddp,zero3",
         "--steps", "2", "--warmup", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["strategy"]: r for r in json.loads(out.read_text())}
    assert rows["ddp"]["img_per_s"] > 0 and rows["zero3"]["img_per_s"] > 0
    assert rows["ddp"]["ema_mib_per_rank"] == rows["ddp"]["full_ema_mib"]
    assert rows["zero3"]["ema_mib_per_rank"] == pytest.approx(rows["zero3"]["full_ema_mib"] / 2, rel=0.01)
    assert rows["zero3"]["param_fraction_per_rank"] == pytest.approx(0.5, abs=0.01)
    assert "zero3 / ddp img/s" in proc.stdout
