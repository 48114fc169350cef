"""Jobs on the real local Slurm, with a stand-in training command (``standin_train.py``, a test
fixture that follows the training side's preemption contract) under the real torchrun: the
warning signal makes the job checkpoint, requeue itself and resume to the same result; jobs that
fail for another reason, or have used up their requeues, are not requeued."""
from __future__ import annotations

import json
import signal

import pytest
import yaml
from .slurm_helpers import (
    HERE, JOB_CEILING, LOCAL_NODE, ended, events, full_log, job_field, job_log, last_step, read_json, requeue_ceiling,
    signal_batch, submit, wait_job,
)

from ldm_train.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
STEPS = 12


def standin_config(tmp_path, name: str, env: dict | None = None, **slurm) -> tuple:
    """A config whose job runs the stand-in with 2 ranks on the CPU-only local node."""
    run = tmp_path / name
    cfg = {
        "run": {"dir": str(run)},
        "train": {"steps": STEPS, "checkpoint_every": 4},
        "slurm": {
            "entry_module": "standin_train", "cpu_processes_per_node": 2, "signal_seconds": 30,
            "env": {"PYTHONPATH": str(HERE), **(env or {})}, **slurm,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, run


def final_value(run) -> dict:
    done = sorted(p for p in (run / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    return json.loads((done[-1] / "state.json").read_text())


def test_signal_checkpoints_requeues_and_resumes_to_the_uninterrupted_result(slurm_cluster, tmp_path, capsys):
    ref_cfg, ref_run = standin_config(tmp_path, "reference")
    ref_job = submit(capsys, "--config", str(ref_cfg))
    cfg, run = standin_config(tmp_path, "preempted", env={"STANDIN_HOLD_AT": "5", "STANDIN_SAVE_SECONDS": "3"})
    job = submit(capsys, "--config", str(cfg))

    # The reference runs through without a signal: finished, never requeued.
    assert wait_job(ref_job, ref_run, lambda: ended(ref_job), JOB_CEILING, "the reference job to end") == "COMPLETED", job_log(ref_run, ref_job)
    assert [e["event"] for e in events(ref_run)] == ["submit", "start", "end"]
    assert events(ref_run)[-1]["state"] == "finished"

    # The other run holds at step 5 (its first start only) until the warning signal comes.
    wait_job(job, run, lambda: last_step(run) == 4, JOB_CEILING, "the run to reach step 4")
    assert main(["slurm", "submit", "--config", str(cfg), *LOCAL_NODE]) == 2  # one job per run folder
    assert "already has Slurm job" in capsys.readouterr().err
    signal_batch(job)
    # Slurm holds the requeued job for its credential lifetime (requeue_hold) after it ended.
    wait_job(job, run, lambda: (read_json(run / "status.json") or {}).get("state") == "finished", requeue_ceiling(),
             "the requeued job to finish")
    assert wait_job(job, run, lambda: ended(job), JOB_CEILING, "the job to end") == "COMPLETED", job_log(run, job)

    kinds = [(e["event"], e.get("restart")) for e in events(run)]
    assert kinds == [("submit", None), ("start", 0), ("signal", 0), ("requeue", 0), ("start", 1), ("end", 1)], job_log(run, job)
    assert job_field(job, "Restarts") == "1"
    # torchrun handled the signal (forwarded it, waited for the save) instead of dying of it
    assert events(run)[3]["exit"] != 128 + signal.SIGUSR1 and "Received 10 death signal" in full_log(run)
    assert (run / "checkpoints" / "step-0000006").is_dir()  # written on the signal, after step 6
    assert final_value(run) == final_value(ref_run) and final_value(run)["step"] == STEPS

    capsys.readouterr()
    assert main(["slurm", "status", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["last_step"] == STEPS - 1 and report["run_state"] == "finished"
    (only,) = report["jobs"]
    assert (only["job_id"], only["state"], only["requeues"], only["starts"]) == (job, "COMPLETED", 1, 2)
    assert main(["slurm", "status", str(run)]) == 0
    table = capsys.readouterr().out
    assert f"{job}" in table and "COMPLETED" in table and "last logged train step 11" in table


def test_a_job_that_fails_is_not_requeued_even_when_signalled(slurm_cluster, tmp_path, capsys):
    cfg, run = standin_config(tmp_path, "crash", env={"STANDIN_HOLD_AT": "3", "STANDIN_CRASH_ON_SIGNAL": "1"})
    job = submit(capsys, "--config", str(cfg))
    wait_job(job, run, lambda: last_step(run) == 2, JOB_CEILING, "the run to reach step 2")
    signal_batch(job)
    assert wait_job(job, run, lambda: ended(job), JOB_CEILING, "the job to end") == "FAILED", job_log(run, job)
    assert [e["event"] for e in events(run)] == ["submit", "start", "signal", "end"], job_log(run, job)
    assert events(run)[-1]["state"] == "failed"
    assert job_field(job, "Restarts") == "0", job_log(run, job)


def test_a_job_whose_command_fails_is_not_requeued(slurm_cluster, tmp_path, capsys):
    cfg, run = standin_config(tmp_path, "broken", entry_module="no_such_module_here")
    job = submit(capsys, "--config", str(cfg))
    assert wait_job(job, run, lambda: ended(job), JOB_CEILING, "the job to end") == "FAILED"
    assert [e["event"] for e in events(run)] == ["submit", "start", "end"]
    assert events(run)[-1]["state"] == "none" and events(run)[-1]["exit"] != 0
    assert job_field(job, "Restarts") == "0"


def test_no_requeue_beyond_max_requeues(slurm_cluster, tmp_path, capsys):
    cfg, run = standin_config(tmp_path, "capped", env={"STANDIN_HOLD_AT": "3"}, max_requeues=0)
    job = submit(capsys, "--config", str(cfg))
    wait_job(job, run, lambda: last_step(run) == 2, JOB_CEILING, "the run to reach step 2")
    signal_batch(job)
    assert wait_job(job, run, lambda: ended(job), JOB_CEILING, "the job to end") == "FAILED", job_log(run, job)
    end = events(run)[-1]
    assert end["event"] == "end" and end["state"] == "preempted" and "max_requeues" in end["reason"]
    assert read_json(run / "status.json")["state"] == "preempted"  # resumable by submitting again


def test_slurm_refusal_is_one_clear_message(slurm_cluster, tmp_path, capsys):
    cfg, run = standin_config(tmp_path, "refused")
    assert main(["slurm", "submit", "--config", str(cfg), *LOCAL_NODE, "--partition", "no_such_partition"]) == 2
    err = capsys.readouterr().err
    assert "sbatch failed" in err and "partition" in err.lower() and "Traceback" not in err
    assert [e["event"] for e in events(run)] == []  # nothing recorded for a job that does not exist
