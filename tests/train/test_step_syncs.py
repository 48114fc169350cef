"""The steady-state training step never makes the host wait for the device: no tensor value read
on the host and no collective between log/checkpoint intervals (counted by launch/bench_step.py's
wrappers), and the deferred outcome (skip, LR schedule, EMA, guard) equals the immediate one."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from ldm_train.train import checkpoint as ck
from ldm_train.train.control import NonFiniteError
from ldm_train.train.outcome import Readback

from conftest import REPO
from test_resume import loop, nan_objective, same


def bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "launch" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counted_run(micro_run, micro_latents, run, steps, monkeypatch):
    reads = []
    real = Readback.read
    monkeypatch.setattr(Readback, "read", lambda self: reads.append(1) or real(self))
    with bench_step().count_syncs() as counts:
        loop(micro_run, micro_latents, run, steps=steps, log_every=10**6, checkpoint_every=10**6)
    return dict(counts), len(reads)


def test_no_synchronising_call_in_a_steady_state_step(micro_run, micro_latents, tmp_path, monkeypatch):
    short, short_reads = counted_run(micro_run, micro_latents, tmp_path / "a", 3, monkeypatch)
    long, long_reads = counted_run(micro_run, micro_latents, tmp_path / "b", 9, monkeypatch)
    assert {k: long[k] - short[k] for k in long} == {k: 0 for k in long}, (short, long)
    # the outcome of each step is read once, from its host copy, during the next step
    assert long_reads - short_reads == 6


def test_deferred_nan_skip_equals_the_immediate_one(micro_run, micro_latents, tmp_path):
    """A NaN at step 3 settled during step 4 (no log there) == settled at once (log every step):
    the same weights, EMA, LR schedule and counts."""
    bad = {3}
    now, later = tmp_path / "now", tmp_path / "later"
    _, ema_now, r_now = loop(micro_run, micro_latents, now, objective=nan_objective(micro_run, bad), steps=6,
                             checkpoint_every=6, log_every=1)
    _, ema_later, r_later = loop(micro_run, micro_latents, later, objective=nan_objective(micro_run, bad), steps=6,
                                 checkpoint_every=6, log_every=100)
    assert r_now.nonfinite_skipped == r_later.nonfinite_skipped == 1
    for which in ("model", "ema"):
        assert same(ck.load_weights(r_now.checkpoint, which), ck.load_weights(r_later.checkpoint, which)), which
    a, b = ck.read_state(r_now.checkpoint), ck.read_state(r_later.checkpoint)
    assert a["lr_scheduler"] == b["lr_scheduler"] and a["lr_scheduler"]["last_epoch"] == 5
    assert a["ema"] == b["ema"] and a["ema"]["num_updates"] == 5
    opt_a, opt_b = ck.load_optimizer_state(r_now.checkpoint), ck.load_optimizer_state(r_later.checkpoint)
    assert all(int(opt_a["state"][i]["step"]) == int(opt_b["state"][i]["step"]) == 5 for i in opt_a["state"])


def test_deferred_guard_stops_before_a_later_checkpoint(micro_run, micro_latents, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        loop(micro_run, micro_latents, run, objective=nan_objective(micro_run, set(range(3, 100))),
             steps=20, checkpoint_every=2, max_nonfinite_steps=3, log_every=100)
    latest = ck.latest_checkpoint(run / "checkpoints")
    assert latest.name == "step-0000004"
    assert all(torch.isfinite(v).all() for v in ck.load_weights(latest, "model").values())
