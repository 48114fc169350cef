"""The save-stall benchmark runs end to end in its smoke mode (the figures themselves are for the notes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow]


def test_bench_save_smoke_reports_both_modes_and_the_ratio(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "bench_save.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    assert rows.keys() == {"sync", "async"}
    for r in rows.values():
        assert r["save_s"] > 0 and r["step_s"] > 0 and r["ckpt_mib"] > 0  # a checkpoint was written and timed
    assert rows["sync"]["ckpt_mib"] == rows["async"]["ckpt_mib"]
    assert "tiny: async / sync save_s = " in proc.stdout
