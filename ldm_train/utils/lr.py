"""The learning-rate schedule both trainers use: linear warm-up, cosine decay to 10% of the peak."""
from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(warmup: int, total: int, *, decay_start: int) -> Callable[[int], float]:
    """LR multiplier for ``LambdaLR``: a linear ramp ``(step + 1) / warmup`` over the first
    ``warmup`` steps, times a cosine from 1 at ``decay_start`` down to 0.1 at ``total`` (flat
    after). Warming up avoids the large early updates of Adam's unconverged moments; ending at
    10% rather than 0 keeps the last steps learning without late oscillation.

    The denoiser starts the cosine when warm-up ends (``decay_start=warmup``); the VAE's short run
    starts it at step 0, so there the two overlap and multiply."""

    def f(step: int) -> float:
        ramp = (step + 1) / warmup if step < warmup else 1.0
        progress = min(1.0, max(0.0, (step - decay_start) / max(1, total - decay_start)))
        return ramp * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    return f
