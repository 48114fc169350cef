"""End to end on the real local Slurm with the real ``ldm-train train`` (micro config, latents
of the session's micro run): a 2-rank job trains, gets the warning signal, checkpoints, requeues
itself, resumes and finishes with bit-identical weights to a job that was never interrupted."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from .slurm_helpers import (
    JOB_CEILING, REPO, ended, events, full_log, job_field, job_log, last_step, read_json, requeue_ceiling, signal_batch,
    submit, wait_job,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
MICRO = REPO / "configs" / "micro.yaml"
STEPS = 40


def submit_train(micro_run, tmp_path, capsys, name: str, *extra: str, steps: int = STEPS) -> tuple:
    """A micro training job of ``steps`` steps (2 ranks on one node unless ``extra`` says else)."""
    run = tmp_path / name
    shutil.copytree(micro_run.cfg.path(micro_run.cfg.latents.dir), run / "latents")
    job = submit(
        capsys, "--config", str(MICRO), f"run.dir={run}", f"train.steps={steps}", f"train.checkpoint_every={steps // 2}",
        "distributed.cpu=true", "slurm.cpu_processes_per_node=2", "slurm.signal_seconds=60", *extra,
    )
    return run, job


def final_weights(run, steps: int = STEPS) -> dict:
    (ckpt,) = [p for p in (run / "checkpoints").glob(f"step-{steps:07d}") if p.is_dir()]
    return load_file(str(ckpt / "model.safetensors"))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(bits(a[k]), bits(b[k]))]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so that the comparison is bitwise (NaNs and -0.0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def preempted_equals_uninterrupted(micro_run, tmp_path, capsys, *extra: str, steps: int = STEPS) -> tuple:
    """Two jobs of ``steps`` steps (``extra``: submit flags and overrides): one gets the warning
    signal mid-run, checkpoints, requeues itself and resumes; both end with bit-identical weights.
    Returns the preempted run and its job id for more checks."""
    run, job = submit_train(micro_run, tmp_path, capsys, "preempted", *extra, steps=steps)
    ref_run, ref_job = submit_train(micro_run, tmp_path, capsys, "reference", *extra, steps=steps)

    # Signal as soon as training has logged a step (its signal handlers are installed by then).
    wait_job(job, run, lambda: last_step(run) is not None, JOB_CEILING, "the first logged training step")
    signal_batch(job)
    wait_job(job, run, lambda: (read_json(run / "status.json") or {}).get("state") == "preempted", JOB_CEILING,
             "the preempted status")
    preempted_at = read_json(run / "status.json")["step"]
    assert 0 < preempted_at < steps, "the signal must land mid-run"

    assert wait_job(job, run, lambda: ended(job), requeue_ceiling(), "the requeued job to finish") == "COMPLETED", job_log(run, job)
    assert wait_job(ref_job, ref_run, lambda: ended(ref_job), JOB_CEILING, "the reference job to finish") == "COMPLETED", job_log(ref_run, ref_job)
    kinds = [(e["event"], e.get("restart")) for e in events(run)]
    assert kinds == [("submit", None), ("start", 0), ("signal", 0), ("requeue", 0), ("start", 1), ("end", 1)], job_log(run, job)
    assert events(run)[-1]["state"] == "finished" and job_field(job, "Restarts") == "1"
    assert "Received 10 death signal" in full_log(run)  # torchrun forwarded USR1 and waited for the save
    assert read_json(run / "status.json")["state"] == "finished"
    assert last_step(run) == steps - 1

    assert_bit_identical(final_weights(run, steps), final_weights(ref_run, steps))
    return run, job


def test_preempted_training_job_resumes_to_the_uninterrupted_weights(micro_run, slurm_cluster, tmp_path, capsys):
    preempted_equals_uninterrupted(micro_run, tmp_path, capsys)


def test_eval_stage_runs_as_a_two_rank_job(micro_run, slurm_cluster, tmp_path, capsys):
    """``--stage eval`` on the same template: sampling split over 2 ranks, report in {run}/eval."""
    run = tmp_path / "run"
    shutil.copytree(micro_run.run, run, ignore=shutil.ignore_patterns("eval", "slurm", "status.json"))
    job = submit(
        capsys, "--stage", "eval", "--config", str(MICRO), f"run.dir={run}", "distributed.cpu=true",
        "slurm.cpu_processes_per_node=2", "--args", "--num-samples 4 --steps 2",
    )
    assert wait_job(job, run, lambda: ended(job), JOB_CEILING, "the eval job to end") == "COMPLETED", job_log(run, job)
    report = read_json(run / "eval" / "report.json")
    assert report is not None and len(list((run / "eval" / "images").glob("*.png"))) == 4
    assert [e["event"] for e in events(run)] == ["submit", "start", "end"]
