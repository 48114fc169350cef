"""Helpers of the Slurm tests: waiting for a job's state (``waiting.poll_until`` with Slurm's view
of the job as what was seen), job states, the run folder's records."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from waiting import poll_until

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LOCAL_SLURM = REPO / "launch" / "slurm_local.sh"
# The local node (launch/slurm_local.sh) has no GPUs and CPUs=2, so that two jobs run at once.
LOCAL_NODE = ("--cpu", "--cpus-per-task", "1")
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol")


def unavailable() -> str | None:
    missing = [t for t in DAEMONS if shutil.which(t) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not found); "
                "`bash launch/setup.sh test` installs slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "the local test Slurm needs root (slurmd starts jobs as their user)"
    return None


# How long a job of these tests may take to run once started, and how long a requeued one may
# take on top of Slurm's hold: ceilings for a hung job on a slow shared machine, not estimates.
JOB_CEILING = 300.0
SEEN = ("JobState", "Reason", "Restarts", "EligibleTime", "StartTime", "NodeList")


@lru_cache(maxsize=None)
def requeue_hold(conf: str | None = None) -> float:
    """Seconds Slurm holds a requeued job: its credential lifetime (AuthInfo cred_expire, default
    120 s) + 1 s, counted from the job's end (``launch/slurm_local.sh`` sets a short one)."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=120).stdout
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "AuthInfo":
            for option in value.strip().split(","):
                name, _, seconds = option.partition("=")
                if name == "cred_expire":
                    return float(seconds) + 1
    return 121.0


def requeue_ceiling() -> float:
    return requeue_hold(os.environ.get("SLURM_CONF")) + JOB_CEILING


def job_fields(job_id: int) -> str:
    """Slurm's view of the job in a line (the fields that say why it is not running)."""
    proc = subprocess.run(["scontrol", "show", "job", "--oneliner", str(job_id)], capture_output=True, text=True, timeout=120)
    fields = dict(t.partition("=")[::2] for t in proc.stdout.split())
    return " ".join(f"{k}={fields[k]}" for k in SEEN if k in fields) or (proc.stderr.strip() or "no such job")


def wait_job(job_id: int, run: Path, predicate, ceiling: float, describe: str):
    """``poll_until`` for a job; fails at once when the job has ended without ``predicate``
    holding (no point in waiting out the ceiling). Either way it reports Slurm's fields, the run's
    job records, its status.json and the job log's tail."""
    def observe() -> str:
        return f"{job_fields(job_id)}; status.json {read_json(run / 'status.json')}\n{job_log(run)}"

    def check():
        value = predicate()
        if not value and ended(job_id) is not None and not predicate():
            raise AssertionError(f"job {job_id} ended before {describe}: {observe()}")
        return value

    return poll_until(check, ceiling, f"{describe} (job {job_id})", observe=observe)


def job_field(job_id: int, key: str) -> str | None:
    proc = subprocess.run(["scontrol", "show", "job", "--oneliner", str(job_id)], capture_output=True, text=True, timeout=120)
    for token in proc.stdout.split():
        k, _, v = token.partition("=")
        if k == key:
            return v
    return None


def ended(job_id: int) -> str | None:
    """The final state once the job has ended (and is not about to be requeued), else None."""
    state = job_field(job_id, "JobState")
    return state if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"} else None


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def events(run: Path) -> list[dict]:
    path = run / "slurm" / "jobs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def last_step(run: Path) -> int | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    steps = [r["step"] for r in records if r.get("stage") == "train" and "step" in r]
    return steps[-1] if steps else None


def signal_batch(job_id: int) -> None:
    """What Slurm does ``--signal`` seconds before the time limit: USR1 to the batch shell."""
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], check=True, timeout=120)


def submit(capsys, *argv: str) -> int:
    """``ldm-train slurm submit ...`` in-process; returns the job id it printed."""
    from ldm_train.cli import main

    capsys.readouterr()
    rc = main(["slurm", "submit", *argv, *(() if "--gpus-per-node" in argv else LOCAL_NODE)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)["job_id"]


def full_log(run: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run / "slurm").glob("*.out")))


def job_log(run: Path, job_id: int | None = None) -> str:
    """For assertion messages: Slurm's view of the job, the run's job records and the job log."""
    info = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True, timeout=120).stdout if job_id else ""
    records = (run / "slurm" / "jobs.jsonl").read_text() if (run / "slurm" / "jobs.jsonl").is_file() else ""
    logs = "\n".join(p.read_text()[-4000:] for p in sorted((run / "slurm").glob("*.out")))
    return f"{info}\n{records}\n{logs}"

