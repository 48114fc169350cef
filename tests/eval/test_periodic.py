"""Evaluation during training: grids on the EMA weights on schedule, TensorBoard, metrics log."""
from __future__ import annotations

import json
import shutil

from PIL import Image

from ldm_train import stages
from conftest import micro_config


def test_train_stage_evaluates_every_n_steps_and_at_the_end(micro_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(micro_run.run, run, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl", "config.yaml"))
    cfg = micro_config(run, "train.steps=5", "train.eval_every=2", "eval.steps=2")
    stages.train_stage(cfg, overwrite=False)
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids == ["step-0000002.png", "step-0000004.png", "step-0000005.png"]  # every 2, and the end
    with Image.open(run / "samples" / "step-0000005.png") as im:
        assert im.width > 0 and im.height > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["stage"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert evals[0]["protocol"]["weights"] == "EMA" and evals[0]["protocol"]["sampler"] == cfg.eval.sampler


def test_guidance_sweep_writes_one_grid_and_record_per_scale(micro_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(micro_run.run, run, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl", "config.yaml"))
    cfg = micro_config(run, "train.steps=2", "train.eval_every=2", "eval.steps=2", "eval.guidance_sweep=[1.0,4.0]")
    stages.train_stage(cfg, overwrite=False)
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-0000002-cfg1.png", "step-0000002-cfg4.png"]
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [r["protocol"]["guidance_scale"] for r in evals] == [1.0, 4.0]
    # offline without weights: the metrics say why they are missing, and training went on
    assert all(r["fid"] is None and "eval.metrics.inception_weights" in r["fid_error"] for r in evals)
    assert all(r["clip_score"] is None and "eval.metrics.clip_weights" in r["clip_error"] for r in evals)
