"""Render the sbatch script of a stage from the template ``job.sbatch`` next to this module (``{{name}}`` fields).

Pure text: nothing here imports the training code or talks to Slurm, so a script can be rendered
and checked for any cluster shape on any machine.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import SlurmConfig
from ..errors import UserError

TEMPLATE = Path(__file__).resolve().parent / "job.sbatch"  # package data (slurm/job.sbatch links here)
STAGES = ("train", "encode", "eval")
FIELD = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class JobRequest:
    """What ``ldm-train slurm submit`` asks for. ``None`` flags fall back to ``slurm.*`` keys."""

    stage: str
    run_dir: Path  # absolute
    config: Path  # the resolved config the job runs with (absolute)
    nodes: int = 1
    gpus_per_node: int = 0
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    stage_args: tuple[str, ...] = ()  # extra arguments of the stage command (eval --num-samples ...)
    overwrite: bool = False
    workdir: Path | None = None  # the job's working directory (default: the submit directory)


def processes_per_node(req: JobRequest, cfg: SlurmConfig) -> int:
    """One rank per GPU; on CPU-only nodes ``slurm.cpu_processes_per_node``."""
    return req.gpus_per_node if req.gpus_per_node > 0 else cfg.cpu_processes_per_node


def _option(name: str, value: str) -> str:
    # #SBATCH lines are not parsed by a shell: a value cannot be quoted, so refuse odd ones.
    if not value or any(c.isspace() for c in value):
        raise UserError(f"slurm {name} {value!r}: must be one word without spaces")
    return f"#SBATCH --{name}={value}"


def sbatch_lines(req: JobRequest, cfg: SlurmConfig) -> list[str]:
    if req.stage not in STAGES:
        raise UserError(f"slurm stage {req.stage!r}: must be one of {', '.join(STAGES)}")
    if req.nodes < 1 or req.gpus_per_node < 0:
        raise UserError(f"--nodes must be >= 1 and --gpus-per-node >= 0 (got {req.nodes}, {req.gpus_per_node})")
    lines = [
        _option("job-name", f"ldm-{req.stage}-{req.run_dir.name}"),
        _option("nodes", str(req.nodes)),
        _option("output", str(req.run_dir / "slurm" / f"{req.stage}-%j.out")),
        _option("chdir", str(req.workdir or Path.cwd())),
    ]
    if req.gpus_per_node > 0:
        lines.append(_option("gpus-per-node", str(req.gpus_per_node)))
    for name in ("partition", "time", "account", "qos", "constraint"):
        value = getattr(req, name) or getattr(cfg, name)
        if value is not None:
            lines.append(_option(name, str(value)))
    if cfg.cpus_per_task is not None:
        lines.append(_option("cpus-per-task", str(cfg.cpus_per_task)))
    if req.exclusive or cfg.exclusive:
        lines.append("#SBATCH --exclusive")
    for extra in cfg.sbatch_args:
        if not extra.startswith("--") or "\n" in extra:
            raise UserError(f"slurm.sbatch_args entry {extra!r}: must be one option such as --mem=0")
        lines.append(f"#SBATCH {extra}")
    return lines


def environment_lines(cfg: SlurmConfig) -> list[str]:
    lines = [f"module load {shlex.quote(m)}" for m in cfg.modules]
    lines += list(cfg.setup)
    for key, value in cfg.env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UserError(f"slurm.env key {key!r}: not a shell variable name")
        lines.append(f"export {key}={shlex.quote(value)}")
    return lines or ["# (none configured)"]


def _dq(arg: str) -> str:
    """Double-quote for the single-quoted per-node command (where ' cannot appear)."""
    if "'" in arg:
        raise UserError(f"stage argument {arg!r}: single quotes are not supported in Slurm jobs")
    return '"' + re.sub(r'([\\"$`])', r"\\\1", arg) + '"'


def launch_command(req: JobRequest, cfg: SlurmConfig) -> str:
    """The per-node command (runs inside ``bash -c '...'`` on every node): the launcher with the
    rendezvous (machine rank = ``$SLURM_NODEID`` of that node), then the stage command."""
    procs = processes_per_node(req, cfg)
    if cfg.launcher == "torchrun":
        head = [
            'exec "$LDM_PY" -m torch.distributed.run',
            f"--nnodes={req.nodes} --nproc-per-node={procs}",
            '--node-rank="$SLURM_NODEID"',
            '--master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"',
            f"-m {cfg.entry_module}",
        ]
    else:
        config = f"--config_file {_dq(cfg.accelerate_config)} " if cfg.accelerate_config else ""
        head = [
            f'exec "$LDM_PY" -m accelerate.commands.launch {config}'.rstrip(),
            f"--num_machines {req.nodes} --num_processes {req.nodes * procs}",
            '--machine_rank "$SLURM_NODEID"',
            '--main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"',
            f"--module {cfg.entry_module}",
        ]
    stage = [req.stage, '--config "$LDM_CONFIG"']
    if req.stage == "eval" and "--checkpoint" not in req.stage_args:
        stage.append(f"--checkpoint {_dq(str(req.run_dir))}")
    stage += [_dq(a) for a in req.stage_args]
    stage.append("$LDM_FIRST_START_ARGS")
    return " \\\n    ".join(head + [" ".join(stage)])


def render(req: JobRequest, cfg: SlurmConfig, template: Path | None = None) -> str:
    """The job script text. ``template`` (or ``slurm.template``) replaces ``slurm/job.sbatch``."""
    path = Path(template or cfg.template or TEMPLATE)
    if not path.is_file():
        raise UserError(f"Slurm job template not found: {path}")
    python = cfg.python or sys.executable
    fields = {
        "stage": req.stage,
        "sbatch_lines": "\n".join(sbatch_lines(req, cfg)),
        "signal_seconds": str(cfg.signal_seconds),
        "max_requeues": str(cfg.max_requeues),
        "run_dir": shlex.quote(str(req.run_dir)),
        "environment": "\n".join(environment_lines(cfg)),
        "python": shlex.quote(python),
        "config": shlex.quote(str(req.config)),
        "first_start_args": "--overwrite" if req.overwrite else "",
        "port": str(cfg.port),
        "nodes": str(req.nodes),
        "launch": launch_command(req, cfg),
    }
    text = path.read_text(encoding="utf-8")
    unknown = sorted(set(FIELD.findall(text)) - set(fields))
    if unknown:
        raise UserError(f"{path}: unknown template fields {', '.join(unknown)} (known: {', '.join(fields)})")
    return FIELD.sub(lambda m: fields[m.group(1)], text)
