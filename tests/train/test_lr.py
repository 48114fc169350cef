"""The one warm-up + cosine schedule gives each trainer exactly the multipliers it had before."""
from __future__ import annotations

import math

import pytest

from ldm_train.utils.lr import warmup_cosine


def denoiser_before(step: int, warmup: int, total: int) -> float:
    """``train/loop.py:lr_lambda`` as it was: pure ramp during warm-up, then the cosine."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, max(1, total) - warmup))))


def vae_before(s: int, steps: int) -> float:
    """The lambda inlined in ``autoencoder/train_vae.py`` as it was: ramp times a cosine from 0."""
    warmup = max(1, steps // 20)
    return min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))


@pytest.mark.parametrize("warmup, total", [(0, 10), (4, 10), (5, 40), (100, 2000), (10, 5), (3, 0)])
def test_denoiser_schedule_is_unchanged(warmup, total):
    f = warmup_cosine(warmup, total, decay_start=warmup)
    steps = range(total + 5)
    assert [f(s) for s in steps] == [denoiser_before(s, warmup, total) for s in steps]  # bit for bit


@pytest.mark.parametrize("steps", [4, 20, 60, 500, 3000])
def test_vae_schedule_is_unchanged(steps):
    f = warmup_cosine(max(1, steps // 20), steps, decay_start=0)
    assert [f(s) for s in range(steps + 5)] == [vae_before(s, steps) for s in range(steps + 5)]


def test_the_two_differ_where_warm_up_and_decay_overlap():
    """Why the schedule takes ``decay_start``: the VAE's cosine has already begun during warm-up."""
    after, during = warmup_cosine(10, 100, decay_start=10), warmup_cosine(10, 100, decay_start=0)
    assert after(4) == 0.5 and during(4) < 0.5
    assert after(100) == during(100) == pytest.approx(0.1)
