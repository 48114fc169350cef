"""The learning-rate schedules: a linear warm-up, then constant, linear, cosine or cosine with
restarts down to a floor. The default (the one both trainers always used) is warm-up + cosine to 10%."""
from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("constant", "linear", "cosine", "cosine_restarts")


def schedule_lambda(name: str, warmup: int, total: int, *, decay_start: int, min_lr_ratio: float = 0.1,
                    num_cycles: int = 1) -> Callable[[int], float]:
    """LR multiplier for ``LambdaLR``: a linear ramp ``(step + 1) / warmup`` over the first
    ``warmup`` steps, times the decay ``name`` from 1 at ``decay_start`` to ``min_lr_ratio`` at
    ``total`` (flat after): ``constant`` (1 throughout), ``linear``, ``cosine``, or
    ``cosine_restarts`` (``num_cycles`` cosines, each restarting at 1; Loshchilov & Hutter 2017)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {name!r} (one of {', '.join(SCHEDULES)})")
    m = min_lr_ratio

    def decay(progress: float) -> float:
        if name == "constant":
            return 1.0
        if name == "linear":
            return m + (1 - m) * (1 - progress)
        if name == "cosine_restarts" and progress < 1.0:
            progress = (progress * num_cycles) % 1.0
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))

    def f(step: int) -> float:
        ramp = (step + 1) / warmup if step < warmup else 1.0
        progress = min(1.0, max(0.0, (step - decay_start) / max(1, total - decay_start)))
        return ramp * decay(progress)

    return f


def warmup_cosine(warmup: int, total: int, *, decay_start: int) -> Callable[[int], float]:
    """Linear warm-up, cosine decay to 10% of the peak. Warming up avoids the large early updates
    of Adam's unconverged moments; ending at 10% rather than 0 keeps the last steps learning without
    late oscillation.

    The denoiser starts the cosine when warm-up ends (``decay_start=warmup``); the VAE's short run
    starts it at step 0, so there the two overlap and multiply."""
    return schedule_lambda("cosine", warmup, total, decay_start=decay_start)
