"""Guard (issue 14): no test depends on a fixed wall-clock wait that a slow machine can exceed.
Every test module under tests/ is parsed; outside ``tests/waiting.py`` (the poll helper):

- no ``time.sleep`` (wait for a state with ``poll_until``, never for a duration);
- no hand-rolled deadline (``time.monotonic()`` / ``time.time()`` / ``time.perf_counter()``);
- every literal ceiling (``timeout=N``, ``x.wait(N)``, ``x.join(N)``, ``poll_until(_, N, ...)``) is
  at least ``MIN_CEILING`` seconds.

A ceiling is a safety net for a hung process, not a guess of how long the work takes."""
from __future__ import annotations

import ast
from pathlib import Path

from waiting import MIN_CEILING

TESTS = Path(__file__).resolve().parent
HELPER = TESTS / "waiting.py"
# Sleeps that are the work being simulated, not a wait for something to happen.
ALLOWED_SLEEPS = {
    TESTS / "slurm" / "standin_train.py": "the stand-in trainer simulates a slow checkpoint write",
}
CLOCKS = {"sleep", "monotonic", "time", "perf_counter", "monotonic_ns", "time_ns"}
CEILING_METHODS = {"wait", "join", "wait_procs"}


def _name(func: ast.expr) -> tuple[str | None, str | None]:
    """(owner, attribute) of a call target: ``time.sleep`` -> ("time", "sleep"), ``f`` -> (None, "f")."""
    if isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else None
        return owner, func.attr
    if isinstance(func, ast.Name):
        return None, func.id
    return None, None


def _number(node: ast.expr | None) -> float | None:
    return float(node.value) if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) else None


def _ceilings(call: ast.Call) -> list[float]:
    """The literal ceilings (seconds) a call passes."""
    owner, attr = _name(call.func)
    found = [_number(k.value) for k in call.keywords if k.arg == "timeout"]
    if attr == "poll_until" and len(call.args) >= 2:
        found.append(_number(call.args[1]))
    if owner != "time" and attr in CEILING_METHODS and call.args:
        found.append(_number(call.args[-1] if attr == "wait_procs" and len(call.args) > 1 else call.args[0]))
    return [c for c in found if c is not None]


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []  # (line, finding)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "time":
            clocks = sorted(a.name for a in node.names if a.name in CLOCKS)
            if clocks and path not in ALLOWED_SLEEPS:
                found.append((node.lineno, f"{path.relative_to(TESTS)}:{node.lineno}: from time import {', '.join(clocks)} (use waiting.poll_until)"))
        if not isinstance(node, ast.Call):
            continue
        owner, attr = _name(node.func)
        if owner == "time" and attr in CLOCKS and not (attr == "sleep" and path in ALLOWED_SLEEPS):
            found.append((node.lineno, f"{path.relative_to(TESTS)}:{node.lineno}: time.{attr}() (poll for a state with waiting.poll_until)"))
        for ceiling in _ceilings(node):
            if ceiling < MIN_CEILING:
                found.append((node.lineno, f"{path.relative_to(TESTS)}:{node.lineno}: a {ceiling:g} s ceiling (at least {MIN_CEILING:g} s)"))
    return [finding for _, finding in sorted(found)]


def test_no_test_waits_for_a_fixed_time():
    modules = sorted(p for p in TESTS.rglob("*.py") if p != HELPER)
    assert len(modules) > 50  # the whole suite is scanned
    found = [v for p in modules for v in violations(p)]
    assert not found, "fixed waits in tests:\n" + "\n".join(found)


def test_the_guard_catches_each_kind_of_fixed_wait(tmp_path, monkeypatch):
    """The guard itself can fail: a module with one of each offence gives one finding each."""
    monkeypatch.setattr(__import__(__name__), "TESTS", tmp_path)
    bad = tmp_path / "test_bad.py"
    bad.write_text(
        "import subprocess, threading, time\n"
        "from waiting import poll_until\n"
        "time.sleep(1)\n"
        "deadline = time.monotonic() + 300\n"
        "subprocess.run(['true'], timeout=30)\n"
        "threading.Event().wait(10)\n"
        "poll_until(lambda: True, 5, 'x')\n"
        "subprocess.run(['true'], timeout=600)\n"  # generous: fine
        "poll_until(lambda: True, 300, 'x')\n"
    )
    found = violations(bad)
    assert [f.split(":")[1] for f in found] == ["3", "4", "5", "6", "7"], found


def test_poll_until_reports_what_it_saw():
    import pytest
    from waiting import poll_until

    now = 0.0  # a variable, so the scan above does not flag it
    assert poll_until(lambda: 7, now, "an instant value") == 7
    with pytest.raises(AssertionError, match=r"ceiling 0s\) for the job to end; last seen: JobState=PENDING"):
        poll_until(lambda: None, now, "the job to end", observe=lambda: "JobState=PENDING")
    with pytest.raises(AssertionError, match="last seen: ''"):
        poll_until(lambda: "", now, "a non-empty answer")
