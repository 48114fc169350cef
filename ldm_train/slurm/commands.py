"""The ``ldm-train slurm submit|status`` subcommands (argparse and dispatch); ``ldm_train.cli``
mounts them."""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from ..config import Config
from .render import STAGES
from .status import format_status, status
from .submit import request_for, submit, with_cpus_per_task

EXAMPLES = """examples:
  ldm-train slurm submit --config demo run.dir=runs/exp1 --nodes 4 --gpus-per-node 8 \\
      --partition gpu --time 24:00:00 --account proj42
  ldm-train slurm submit --config demo --nodes 2 --gpus-per-node 8 --dry-run
  ldm-train slurm submit --stage eval --config demo --gpus-per-node 1 --args "--num-samples 1000"
  ldm-train slurm submit --stage encode --config demo --nodes 2 --cpu --cpus-per-task 32
  ldm-train slurm status runs/exp1
"""


def add_slurm_parser(sub, common) -> None:
    """``sub``: the top-level subparsers; ``common`` adds --config/--overwrite/overrides."""
    slurm = sub.add_parser(
        "slurm", help="submit a stage as a Slurm job (requeued on preemption), show a run's jobs",
        description="Run a stage as a Slurm job from the template slurm/job.sbatch; see README \"Slurm\".",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = slurm.add_subparsers(dest="action", required=True, metavar="{submit,status}")
    sub_p = actions.add_parser(
        "submit", help="render the job script into {run}/slurm/ and sbatch it (--dry-run: print it)",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub_p.add_argument("--stage", choices=STAGES, default="train", help="the stage the job runs (default: train)")
    sub_p.add_argument("--nodes", type=int, default=1, help="nodes; one launcher per node (default: 1)")
    sub_p.add_argument("--gpus-per-node", type=int, default=None,
                       help="GPUs per node = ranks per node (required unless --cpu)")
    sub_p.add_argument("--cpu", action="store_true",
                       help="CPU-only nodes, no GPUs asked for: slurm.cpu_processes_per_node ranks per node")
    sub_p.add_argument("--cpus-per-task", type=int, default=None, metavar="N",
                       help="CPUs of each node's launcher (default: slurm.cpus_per_task, else ranks per node "
                            "x (latents.loader.num_workers + 2): per rank its loader workers, itself and one spare)")
    for name, what in (("partition", "partition"), ("time", "time limit, e.g. 24:00:00"), ("account", "account to charge"),
                       ("qos", "quality of service"), ("constraint", "node features, e.g. a100")):
        sub_p.add_argument(f"--{name}", default=None, help=f"{what} (default: slurm.{name})")
    sub_p.add_argument("--exclusive", action="store_true", help="whole nodes only (default: slurm.exclusive)")
    sub_p.add_argument("--args", default="", metavar="STRING",
                       help='extra arguments for the stage command, e.g. "--num-samples 1000" for eval')
    sub_p.add_argument("--dry-run", action="store_true", help="print the job script; write and submit nothing")
    common(sub_p)
    stat = actions.add_parser("status", help="a run's jobs: ids, states, requeues, last logged step")
    stat.add_argument("run", type=Path, help="the run folder (run.dir)")
    stat.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_slurm(args: argparse.Namespace, cfg: Config) -> dict:
    if args.action == "status":
        report = status(args.run)
        print(json.dumps(report, indent=2) if args.json else format_status(report))
        return {}
    req = request_for(
        cfg, args.stage, nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpu=args.cpu, partition=args.partition,
        time=args.time, account=args.account, qos=args.qos, constraint=args.constraint,
        exclusive=args.exclusive, stage_args=tuple(shlex.split(args.args)), overwrite=args.overwrite,
    )
    result = submit(with_cpus_per_task(cfg, args.cpus_per_task), req, dry_run=args.dry_run)
    if args.dry_run:
        print(result["script"], end="")
        return {}
    return result
