"""The rendered job script, without a cluster: a 4-node x 8-GPU request checked line by line for
the rank, address and port logic (and the per-node command run as each node's shell would run
it), the #SBATCH options, the CLI's dry run and its refusals."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from .slurm_helpers import REPO

from ldm_train.cli import main
from ldm_train.config import SlurmConfig
from ldm_train.errors import UserError
from ldm_train.slurm.render import JobRequest, render

RUN = Path("/scratch/runs/exp1")


def four_by_eight(**slurm) -> str:
    req = JobRequest(
        "train", RUN, RUN / "slurm" / "train-config.yaml", nodes=4, gpus_per_node=8, partition="gpu",
        time="24:00:00", account="proj42", exclusive=True, workdir=Path("/home/me/ldm"),
    )
    return render(req, SlurmConfig(port=29500, python="/opt/venv/bin/python", **slurm))


def srun_command(script: str) -> tuple[str, str]:
    """(the srun line up to ``bash -c``, the single-quoted per-node command)."""
    m = re.search(r"^(srun [^\n]*?) bash -c '(.*?)' &$", script, re.M | re.S)
    assert m, "no backgrounded `srun ... bash -c '...' &` line"
    return m.group(1), m.group(2)


def test_four_nodes_eight_gpus_line_by_line():
    script = four_by_eight()
    lines = script.splitlines()
    sbatch = [x for x in lines if x.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=ldm-train-exp1",
        "#SBATCH --nodes=4",
        "#SBATCH --output=/scratch/runs/exp1/slurm/train-%j.out",
        "#SBATCH --chdir=/home/me/ldm",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=24:00:00",
        "#SBATCH --account=proj42",
        "#SBATCH --exclusive",
        "#SBATCH --ntasks-per-node=1",  # one launcher per node
        "#SBATCH --signal=B:USR1@300",  # to the batch shell, 300 s before the limit
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",  # a requeued run appends to the same log
    ]
    # #SBATCH lines are only read before the first command
    first_command = next(i for i, x in enumerate(lines) if x and not x.startswith("#"))
    assert all(lines.index(x) < first_command for x in sbatch)
    # address: the first host of the allocation; port: fixed base + job id, computed in the job
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in lines
    assert "MASTER_PORT=$(( 29500 + SLURM_JOB_ID % 1000 ))" in lines
    assert "export MASTER_ADDR MASTER_PORT" in lines
    assert "export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in lines
    assert "export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE" in lines
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300" in lines
    assert "export LDM_PY=/opt/venv/bin/python" in lines
    assert "export LDM_CONFIG=/scratch/runs/exp1/slurm/train-config.yaml" in lines
    head, per_node = srun_command(script)
    assert head == "srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1"
    # the rank is in single quotes: expanded by each node's shell, not once on the first node
    assert [x.strip(" \\") for x in per_node.splitlines()] == [
        'exec "$LDM_PY" -m torch.distributed.run',
        "--nnodes=4 --nproc-per-node=8",
        '--node-rank="$SLURM_NODEID"',
        '--master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"',
        "-m ldm_train.cli",
        'train --config "$LDM_CONFIG" $LDM_FIRST_START_ARGS',
    ]
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    # no `scontrol update StartTime=...` after the requeue: it races the job's end (issue 14)
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "scontrol update" in line or "StartTime" in line]


@pytest.mark.parametrize("node", [0, 1, 3])
def test_each_node_expands_its_own_rank(node, tmp_path):
    """Run the per-node command as node N's bash would, with ``echo`` as the Python: the argv
    carries that node's rank and the shared address and port."""
    _, per_node = srun_command(four_by_eight())
    env = dict(os.environ, LDM_PY="echo", SLURM_NODEID=str(node), MASTER_ADDR="gpu-a017", MASTER_PORT="29742",
               LDM_CONFIG="/c.yaml", LDM_FIRST_START_ARGS="")
    out = subprocess.run(["bash", "-c", per_node], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [
        "-m", "torch.distributed.run", "--nnodes=4", "--nproc-per-node=8", f"--node-rank={node}",
        "--master-addr=gpu-a017", "--master-port=29742", "-m", "ldm_train.cli", "train", "--config", "/c.yaml",
    ]


def test_batch_shell_computes_address_and_port(tmp_path):
    """The address and port lines, run by bash with Slurm's variables and a `scontrol` that
    expands a node list the way Slurm's does."""
    script = four_by_eight()
    block = "\n".join(x for x in script.splitlines() if x.startswith(("MASTER_", "export MASTER_")))
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/bash\n[ "$1 $2 $3" = "show hostnames gpu-a[017-020]" ] && printf "gpu-a017\\ngpu-a018\\ngpu-a019\\ngpu-a020\\n"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[017-020]", SLURM_JOB_ID="123456")
    out = subprocess.run(["bash", "-c", block + '\necho "$MASTER_ADDR $MASTER_PORT"'], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["gpu-a017", str(29500 + 123456 % 1000)]


def test_script_is_valid_bash_and_fills_every_field():
    script = four_by_eight(modules=["cuda/12.4"], setup=["source /opt/venv/bin/activate"], env={"NCCL_DEBUG": "WARN"})
    assert "{{" not in script.replace("{{...}}", "")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    lines = script.splitlines()
    assert lines.index("module load cuda/12.4") < lines.index("source /opt/venv/bin/activate") < lines.index("export NCCL_DEBUG=WARN")


def test_cpu_nodes_and_accelerate_launcher():
    req = JobRequest("eval", RUN, RUN / "slurm" / "eval-config.yaml", nodes=2, stage_args=("--num-samples", "64"))
    cfg = SlurmConfig(launcher="accelerate", accelerate_config="launch/accelerate/single.yaml", cpu_processes_per_node=3)
    script = render(req, cfg)
    assert "--gpus-per-node" not in script
    _, per_node = srun_command(script)
    flat = " ".join(x.strip(" \\") for x in per_node.splitlines())
    assert flat == (
        'exec "$LDM_PY" -m accelerate.commands.launch --config_file "launch/accelerate/single.yaml" '
        '--num_machines 2 --num_processes 6 --machine_rank "$SLURM_NODEID" '
        '--main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" --module ldm_train.cli '
        'eval --config "$LDM_CONFIG" --checkpoint "/scratch/runs/exp1" "--num-samples" "64" $LDM_FIRST_START_ARGS'
    )


def test_refusals_are_user_errors(tmp_path):
    base = dict(stage="train", run_dir=RUN, config=RUN / "c.yaml")
    with pytest.raises(UserError, match="one word"):
        render(JobRequest(**base, partition="gpu a100"), SlurmConfig())
    with pytest.raises(UserError, match="--nodes"):
        render(JobRequest(**base, nodes=0), SlurmConfig())
    with pytest.raises(UserError, match="not a shell variable"):
        render(JobRequest(**base), SlurmConfig(env={"BAD-NAME": "1"}))
    with pytest.raises(UserError, match="template not found"):
        render(JobRequest(**base), SlurmConfig(template=str(tmp_path / "none.sbatch")))
    custom = tmp_path / "mine.sbatch"
    custom.write_text("#!/bin/bash\n{{sbatch_lines}}\n{{no_such_field}}\n")
    with pytest.raises(UserError, match="no_such_field"):
        render(JobRequest(**base), SlurmConfig(template=str(custom)))


def test_cli_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["slurm", "submit", "--config", str(REPO / "configs" / "micro.yaml"), f"run.dir={run}",
            "--nodes", "2", "--gpus-per-node", "4", "--qos", "high", "--dry-run", "slurm.max_requeues=3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH --qos=high" in out and "MAX_REQUEUES=3" in out
    assert "--nnodes=2 --nproc-per-node=4" in out
    assert not run.exists()


def test_cli_errors_without_slurm_and_on_bad_config(tmp_path, capsys, monkeypatch):
    micro = str(REPO / "configs" / "micro.yaml")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    assert main(["slurm", "submit", "--config", micro, f"run.dir={tmp_path / 'run'}", "--cpu"]) == 2
    err = capsys.readouterr().err
    assert "Slurm is not installed" in err and "sbatch" in err and "Traceback" not in err
    assert main(["slurm", "submit", "--config", micro, "slurm.max_requeues=-1", "--dry-run"]) == 2
    assert "slurm.max_requeues" in capsys.readouterr().err
    assert main(["slurm", "status", str(tmp_path / "nothing")]) == 2
    assert "no Slurm jobs recorded" in capsys.readouterr().err


def dry_run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["slurm", "submit", "--config", str(REPO / "configs" / "micro.yaml"), "run.dir=/scratch/r", "--dry-run", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_gpus_per_node_is_required_unless_cpu(capsys):
    rc, out, err = dry_run(capsys, "--nodes", "2")
    assert rc == 2 and not out and "--gpus-per-node is required" in err and "--cpu" in err and "Traceback" not in err
    rc, _, err = dry_run(capsys, "--cpu", "--gpus-per-node", "4")
    assert rc == 2 and "--cpu and --gpus-per-node 4" in err
    rc, out, _ = dry_run(capsys, "--cpu", "slurm.cpu_processes_per_node=3")
    assert rc == 0 and "--gpus-per-node" not in out and "--nproc-per-node=3" in out


@pytest.mark.parametrize("argv, cpus", [
    (["--gpus-per-node", "4"], 16),  # 4 ranks x (2 loader workers + the rank + 1 spare)
    (["--gpus-per-node", "8", "latents.loader.num_workers=6"], 64),
    (["--cpu", "slurm.cpu_processes_per_node=2", "latents.loader.num_workers=0"], 4),
    (["--gpus-per-node", "4", "slurm.cpus_per_task=40"], 40),  # the key overrides the formula
    (["--gpus-per-node", "4", "slurm.cpus_per_task=40", "--cpus-per-task", "12"], 12),  # and the flag the key
])
def test_cpus_per_task_defaults_from_ranks_and_loader_workers(capsys, argv, cpus):
    rc, out, err = dry_run(capsys, *argv)
    assert rc == 0, err
    assert [x for x in out.splitlines() if x.startswith("#SBATCH --cpus-per-task")] == [f"#SBATCH --cpus-per-task={cpus}"]


def test_cpus_per_task_flag_is_checked(capsys):
    rc, _, err = dry_run(capsys, "--gpus-per-node", "1", "--cpus-per-task", "0")
    assert rc == 2 and "--cpus-per-task must be >= 1" in err


@pytest.mark.parametrize("argv", [["slurm", "submit", "--help"], ["slurm", "status", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0 and capsys.readouterr().out.startswith("usage: ldm-train slurm")


def test_slurm_package_imports_no_training_layer():
    from test_layering import LAYERS, PKG, scan, subpackage_of

    for path in (PKG / "slurm").glob("*.py"):
        layers = {subpackage_of(m) for m in scan(path)} & set(LAYERS)
        assert not layers, f"{path} imports {layers}"
        assert not {m for m in scan(path) if m.split(".")[0] in ("torch", "accelerate")}, path


def test_slurm_keys_may_change_between_jobs_of_a_run(tmp_path):
    """A run resubmitted with other Slurm settings (more requeues, another partition) is the
    same run: the stages' config check ignores ``slurm.*`` but still refuses real changes."""
    from ldm_train.config import load_config
    from ldm_train.utils.runs import OutputExistsError, record_config

    micro = REPO / "configs" / "micro.yaml"
    record_config(load_config(micro, [f"run.dir={tmp_path}"]), False)
    record_config(load_config(micro, [f"run.dir={tmp_path}", "slurm.max_requeues=2", "slurm.partition=gpu"]), False)
    with pytest.raises(OutputExistsError, match="train.lr"):
        record_config(load_config(micro, [f"run.dir={tmp_path}", "train.lr=0.5"]), False)
