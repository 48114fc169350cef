"""The one way a test waits: poll for a state, with a generous ceiling, and on failure say what
was seen. ``tests/test_waits.py`` checks that no other test module sleeps, hand-rolls a deadline,
or gives a subprocess/thread/poll a ceiling below ``MIN_CEILING`` (a slow, shared CI machine
must never turn a correct run into a failure)."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")
MIN_CEILING = 120.0  # seconds: the smallest ceiling a test may give any wait


def poll_until(predicate: Callable[[], T], ceiling: float, describe: str,
               observe: Callable[[], object] | None = None, interval: float = 0.2) -> T:
    """Call ``predicate()`` until it returns something truthy, and return that. After ``ceiling``
    seconds raise AssertionError naming ``describe`` (what was awaited), how long it waited and
    the last thing seen: ``observe()`` when given (e.g. the job's Slurm fields), else the last
    value of ``predicate()``."""
    start = time.monotonic()
    while True:
        value = predicate()
        if value:
            return value
        waited = time.monotonic() - start
        if waited > ceiling:
            seen = observe() if observe is not None else repr(value)
            raise AssertionError(f"waited {waited:.0f}s (ceiling {ceiling:.0f}s) for {describe}; last seen: {seen}")
        time.sleep(interval)
