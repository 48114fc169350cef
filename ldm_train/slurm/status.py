"""``ldm-train slurm status RUN``: the run's jobs (ids, states, requeues) and its progress, from
the run folder's records plus whatever the Slurm controller or accounting still knows."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from . import tools
from .submit import JOBS, read_jobs, slurm_dir


def last_train_step(run_dir: Path) -> int | None:
    """The last ``step`` logged by training in ``{run}/metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    step = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written right now
        if record.get("stage") == "train" and isinstance(record.get("step"), int):
            step = record["step"]
    return step


def run_state(run_dir: Path) -> dict | None:
    """``{run}/status.json`` as the training loop last wrote it."""
    try:
        return json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def job_summary(job_id: int, events: list[dict]) -> dict:
    """One job: its recorded events folded together, then Slurm's view where available."""
    mine = [e for e in events if e.get("job_id") == job_id]
    submit = next(e for e in mine if e.get("event") == "submit")
    ends = [e for e in mine if e.get("event") == "end"]
    state, restarts = tools.job_state(job_id)
    requeues = sum(e.get("event") == "requeue" for e in mine)
    return {
        "job_id": job_id,
        "stage": submit.get("stage"),
        "state": state or (f"ENDED ({ends[-1].get('state')})" if ends else "UNKNOWN"),
        "requeues": max(requeues, restarts or 0),
        "starts": sum(e.get("event") == "start" for e in mine),
        "signals": sum(e.get("event") == "signal" for e in mine),
        "last_event": mine[-1].get("event"),
        "script": submit.get("script"),
    }


def status(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    events = read_jobs(run_dir)
    if not events:
        raise UserError(f"no Slurm jobs recorded for {run_dir} ({slurm_dir(run_dir) / JOBS} is missing or empty)")
    ids = [e["job_id"] for e in events if e.get("event") == "submit"]
    state = run_state(run_dir)
    return {
        "run": str(run_dir),
        "jobs": [job_summary(j, events) for j in ids],
        "last_step": last_train_step(run_dir),
        "run_state": state.get("state") if state else None,
    }


def format_status(report: dict) -> str:
    lines = [f"run {report['run']}: last logged train step {report['last_step']}, status.json {report['run_state']}"]
    lines.append(f"{'job':>10}  {'stage':<7} {'state':<22} {'requeues':>8}  {'starts':>6}  last event")
    for j in report["jobs"]:
        lines.append(f"{j['job_id']:>10}  {j['stage']:<7} {j['state']:<22} {j['requeues']:>8}  {j['starts']:>6}  {j['last_event']}")
    return "\n".join(lines)
