"""Run control around the loop: preemption signals, the run's status file, the non-finite guard
and the step-time watchdog.

**Preemption.** SIGUSR1 (Slurm's ``--signal``) and SIGTERM (preemption, ``scancel``) only set a
flag. At the end of every step the ranks agree (one all-reduce) on whether any of them was
signalled, so all stop after the same step, save a checkpoint and exit with
``Preempted.exit_code`` (75). A second signal during the save only bumps the count: the save is never
interrupted. ``{run}/status.json`` says ``running``, ``preempted``, ``finished`` or ``failed``
with the step; the Slurm batch script requeues on ``preempted``.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import UserError

STATUS = "status.json"


class NonFiniteError(UserError):
    """Too many non-finite steps in a row; the last good checkpoint is intact."""


class SignalFlag:
    """Records SIGUSR1/SIGTERM instead of dying; restores the previous handlers on close."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received: list[int] = []
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)

    @property
    def raised(self) -> bool:
        return bool(self.received)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def write_status(run_dir: Path, state: str, step: int, **extra) -> None:
    """Atomically replace ``{run}/status.json`` (rank 0 only)."""
    record = {"state": state, "step": step, "time": time.time(), "pid": os.getpid(), **extra}
    tmp = run_dir / (STATUS + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(run_dir / STATUS)


class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss or gradient; ``limit`` in a row is fatal."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def record(self, finite: bool, step: int) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        print(f"[ldm_train] step {step}: non-finite loss or gradient, step skipped ({self.in_a_row} in a row)", file=sys.stderr)
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} non-finite steps in a row (up to step {step}); stopping. The last good checkpoint "
                "is intact: lower train.lr, raise train.lr_schedule.warmup_steps or check the data, then re-run to resume "
                "(train.max_nonfinite_steps sets the limit)"
            )


class Watchdog:
    """A thread that reports, once per stall, a rank whose current step takes longer than
    ``seconds``: the usual sign of a hung collective or a dead data source on one node."""

    def __init__(self, seconds: float, rank: int, report=None):
        self.seconds = seconds
        self.rank = rank
        self.report = report or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stalls = 0
        self._beat = (time.monotonic(), 0)
        self._stop = threading.Event()
        self._thread = None
        if seconds > 0:
            self._thread = threading.Thread(target=self._watch, name="ldm-train-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        self._beat = (time.monotonic(), step)

    def _watch(self) -> None:
        reported_for = None
        while not self._stop.wait(self.seconds / 4):
            since, step = self._beat
            waited = time.monotonic() - since
            if waited > self.seconds and reported_for != since:
                reported_for = since
                self.stalls += 1
                self.report(f"[ldm_train] watchdog: rank {self.rank} has spent {waited:.0f} s on step {step + 1} "
                            f"(limit train.watchdog_seconds={self.seconds:g})")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
