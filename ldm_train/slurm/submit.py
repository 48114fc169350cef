"""``ldm-train slurm submit``: render the job script, keep it (and the resolved config it runs
with) in ``{run}/slurm/``, submit it with sbatch and record the job in ``{run}/slurm/jobs.jsonl``."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import Config, dump_config
from ..errors import UserError
from . import tools
from .render import JobRequest, processes_per_node, render

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


def request_for(cfg: Config, stage: str, gpus_per_node: int | None = None, cpu: bool = False, **flags) -> JobRequest:
    """The job request of ``stage`` for the run of ``cfg`` (its folder made absolute). GPUs are
    asked for explicitly (``gpus_per_node``) or declined (``cpu``): a forgotten flag must not
    silently become a CPU job."""
    if cpu and gpus_per_node:
        raise UserError(f"--cpu and --gpus-per-node {gpus_per_node}: a job is either CPU-only or has GPUs; pass one")
    if gpus_per_node is None and not cpu:
        raise UserError("--gpus-per-node is required (GPUs per node = ranks per node); "
                        "pass --cpu for a CPU-only job (slurm.cpu_processes_per_node ranks per node)")
    run_dir = cfg.path("{run}").resolve()
    config = slurm_dir(run_dir) / f"{stage}-config.yaml"
    return JobRequest(stage=stage, run_dir=run_dir, config=config, workdir=Path.cwd(),
                      gpus_per_node=gpus_per_node or 0, **flags)


def with_cpus_per_task(cfg: Config, cpus: int | None) -> Config:
    """``cfg`` with the --cpus-per-task flag (when given) in place of ``slurm.cpus_per_task``."""
    if cpus is None:
        return cfg
    if cpus < 1:
        raise UserError(f"--cpus-per-task must be >= 1 (got {cpus})")
    return cfg.model_copy(update={"slurm": cfg.slurm.model_copy(update={"cpus_per_task": cpus})})


def cpus_per_task(cfg: Config, req: JobRequest) -> int:
    """CPUs of each node's launcher: ``slurm.cpus_per_task``, else per rank its latent loader
    workers + the rank itself + 1 spare, times the ranks per node."""
    if cfg.slurm.cpus_per_task is not None:
        return cfg.slurm.cpus_per_task
    return processes_per_node(req, cfg.slurm) * (cfg.latents.loader.num_workers + 2)


def submit(cfg: Config, req: JobRequest, dry_run: bool = False) -> dict:
    """Render; with ``dry_run`` return the script only. Else write the resolved config and the
    script to ``{run}/slurm/``, sbatch it, record the job id."""
    script = render(req, cfg.slurm.model_copy(update={"cpus_per_task": cpus_per_task(cfg, req)}))
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
