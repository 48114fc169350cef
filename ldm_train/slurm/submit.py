"""``ldm-train slurm submit``: render the job script, keep it (and the resolved config it runs
with) in ``{run}/slurm/``, submit it with sbatch and record the job in ``{run}/slurm/jobs.jsonl``."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import Config, dump_config
from ..errors import UserError
from . import tools
from .render import JobRequest, render

JOBS = "jobs.jsonl"


def slurm_dir(run_dir: Path) -> Path:
    return run_dir / "slurm"


def read_jobs(run_dir: Path) -> list[dict]:
    """Every event of the run's jobs: ``submit`` (written here), ``start``, ``signal``,
    ``requeue`` and ``end`` (written by the job script)."""
    path = slurm_dir(run_dir) / JOBS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a node failure must not hide the others
    return records


def append_job_event(run_dir: Path, **record) -> None:
    record.setdefault("time", int(time.time()))
    with (slurm_dir(run_dir) / JOBS).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def job_ids(records: list[dict]) -> list[int]:
    """Submitted job ids, oldest first."""
    return [r["job_id"] for r in records if r.get("event") == "submit"]


def refuse_active_job(run_dir: Path) -> None:
    """Two jobs writing one run folder would corrupt it."""
    for job_id in job_ids(read_jobs(run_dir)):
        state, _ = tools.job_state(job_id)
        if state is not None and state.split()[0] in tools.ACTIVE:
            raise UserError(
                f"run {run_dir} already has Slurm job {job_id} ({state}); "
                f"wait for it, or `scancel {job_id}` first"
            )


def request_for(cfg: Config, stage: str, **flags) -> JobRequest:
    """The job request of ``stage`` for the run of ``cfg`` (its folder made absolute)."""
    run_dir = cfg.path("{run}").resolve()
    config = slurm_dir(run_dir) / f"{stage}-config.yaml"
    return JobRequest(stage=stage, run_dir=run_dir, config=config, workdir=Path.cwd(), **flags)


def submit(cfg: Config, req: JobRequest, dry_run: bool = False) -> dict:
    """Render; with ``dry_run`` return the script only. Else write the resolved config and the
    script to ``{run}/slurm/``, sbatch it, record the job id."""
    script = render(req, cfg.slurm)
    if dry_run:
        return {"script": script}
    if not tools.have("sbatch"):
        tools.run("sbatch")  # raises the clear "Slurm is not installed" error
    refuse_active_job(req.run_dir)
    folder = slurm_dir(req.run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, req.config)  # the job (and every requeue of it) runs exactly this config
    path = folder / f"{req.stage}-{len(list(folder.glob(f'{req.stage}-*.sbatch'))) + 1}.sbatch"
    path.write_text(script, encoding="utf-8")
    job_id = tools.sbatch(str(path))
    append_job_event(
        req.run_dir, event="submit", job_id=job_id, stage=req.stage, script=str(path),
        nodes=req.nodes, gpus_per_node=req.gpus_per_node,
    )
    return {
        "job_id": job_id,
        "script": str(path),
        "log": str(folder / f"{req.stage}-{job_id}.out"),
        "status": f"ldm-train slurm status {req.run_dir}",
    }
