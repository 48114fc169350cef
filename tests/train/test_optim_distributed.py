"""Two processes (torchrun, gloo on the CPU) under DeepSpeed ZeRO with the optimizers that support
it: 2N steps == N steps + resume + N steps bit for bit (weights, EMA, every rank's optimizer
partition). Adafactor under ZeRO, and Prodigy under ZeRO with several CPU processes (prodigyopt
all-reduces through CUDA tensors), are refused before any work (tests/train/test_optim.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import copy_run
from test_distributed import assert_same, final_state, run_ok, train_cmd

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

CASES = [("zero2", "lion"), ("zero2", "adamw8bit"), ("zero3", "lion"), ("zero1", "adamw8bit")]


@pytest.mark.parametrize("strategy, name", CASES, ids=[f"{s}-{n}" for s, n in CASES])
def test_two_ranks_resume_bitwise(micro_run, tmp_path, strategy, name):
    n = 2
    common = [f"train.steps={2 * n}", f"train.checkpoint_every={n}", f"distributed.strategy={strategy}",
              "train.log_every=1", f"train.optimizer.name={name}", "train.lr_schedule.name=linear"]
    whole = copy_run(micro_run, tmp_path / "whole")
    run_ok(train_cmd(whole, *common), tmp_path)
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut, symlinks=True)
    shutil.rmtree(cut / "checkpoints" / f"step-{2 * n:07d}")
    out = run_ok(train_cmd(cut, *common), tmp_path)
    summary, _ = json.JSONDecoder().raw_decode(out.stdout[out.stdout.index("{"):])
    assert summary["resumed_from"].endswith(f"step-{n:07d}")
    a, b = final_state(whole, 2 * n), final_state(cut, 2 * n)
    assert_same(a, b)
    assert all(torch.isfinite(v).all() for k, v in a.items() if k.startswith("model/"))
