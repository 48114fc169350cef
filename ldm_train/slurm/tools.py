"""The Slurm commands (sbatch, squeue, scontrol, sacct) through subprocess, with one clear error
when Slurm is not installed."""
from __future__ import annotations

import shutil
import subprocess

from ..errors import UserError

# States in which a job still owns (or will own) the run folder.
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
          "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


class SlurmError(UserError):
    """Slurm is missing or refused a request; the message carries Slurm's own words."""


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def run(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not have(tool):
        raise SlurmError(f"Slurm is not installed here: `{tool}` is not on PATH (run this on a cluster login node)")
    try:
        proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{tool} did not answer within 120 s (is the Slurm controller up? `scontrol ping`)") from None
    if check and proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise SlurmError(f"{tool} failed: {message[-1] if message else f'exit code {proc.returncode}'}")
    return proc


def sbatch(script: str) -> int:
    """Submit the job script at path ``script``; returns the job id."""
    out = run("sbatch", "--parsable", script).stdout.strip()
    try:
        return int(out.split(";")[0])
    except ValueError:
        raise SlurmError(f"sbatch printed no job id: {out!r}") from None


def job_info(job_id: int) -> dict | None:
    """``scontrol show job`` as a dict (JobState, Restarts, ...); None once Slurm has forgotten
    the job (MinJobAge after it ended) or when scontrol is missing."""
    if not have("scontrol"):
        return None
    proc = run("scontrol", "show", "job", "--oneliner", str(job_id), check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    info = {}
    for token in proc.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def accounting_state(job_id: int) -> str | None:
    """The final state from ``sacct`` where accounting is enabled (None otherwise)."""
    if not have("sacct"):
        return None
    proc = run("sacct", "--noheader", "--parsable2", "-X", "-j", str(job_id), "-o", "State", check=False)
    lines = proc.stdout.strip().splitlines() if proc.returncode == 0 else []
    return lines[-1].split()[0] if lines else None


def job_state(job_id: int) -> tuple[str | None, int | None]:
    """(state, restarts) from the controller, else from accounting, else (None, None)."""
    info = job_info(job_id)
    if info is not None:
        restarts = info.get("Restarts")
        return info.get("JobState"), int(restarts) if restarts and restarts.isdigit() else None
    return accounting_state(job_id), None
