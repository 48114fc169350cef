"""Time the quick ``ldm-train`` commands (help, a config error, export with no checkpoint).

Each command runs N times in a fresh subprocess; the table shows the median and the minimum wall
seconds and the exit status. Usage: ``python launch/bench_cli.py [-n 5] [--exe PATH]`` (default
executable: the ``ldm-train`` next to this interpreter).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def commands(run_dir: Path) -> list[tuple[str, list[str]]]:
    return [
        ("--help", ["--help"]),
        ("train --help", ["train", "--help"]),
        ("config error", ["train", "train.lr=fast", f"run.dir={run_dir}"]),
        ("export, no checkpoint", ["export", f"run.dir={run_dir}"]),
    ]


def time_one(argv: list[str], n: int, cwd: str) -> tuple[float, float, int]:
    times, rc = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        rc = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5, help="runs per command")
    ap.add_argument("--exe", default=str(Path(sys.executable).parent / "ldm-train"), help="the ldm-train executable")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(name, *time_one([args.exe, *argv], args.n, tmp)) for name, argv in commands(Path(tmp) / "run")]
    print(f"{'command':<24} {'median s':>9} {'min s':>7} {'rc':>3}   (n={args.n})")
    for name, med, low, rc in rows:
        print(f"{name:<24} {med:>9.3f} {low:>7.3f} {rc:>3}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
