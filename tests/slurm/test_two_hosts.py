"""Real two-node jobs on one machine: ``launch/slurm_local.sh --hosts 2`` makes each node a network
namespace with its own address (10.77.N.1 and .2) and slurmd; the ranks of a job meet over the
veth pair with gloo (CPU). A 2-node x 1-process training job is preempted, requeues and resumes
to the weights of an uninterrupted 2-node job; ``accelerate launch`` with the shipped multi-node
yaml, one launcher per namespace, trains as two machines."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from .slurm_helpers import JOB_CEILING, LOCAL_SLURM, REPO, events, full_log, job_field
from .test_train_job import MICRO, STEPS, assert_bit_identical, final_weights, preempted_equals_uninterrupted

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
LAUNCH_STEPS = 8  # the accelerate test has no signal to land mid-run: a few steps show it
# Each namespace has one interface to the other host: ldm0 (gloo would otherwise pick the address
# of this machine's hostname, which the namespaces do not have).
TWO_NODES = ("--nodes", "2", "slurm.cpu_processes_per_node=1", "slurm.env.GLOO_SOCKET_IFNAME=ldm0")


def test_two_node_job_is_preempted_and_resumes_to_the_uninterrupted_weights(micro_run, two_host_cluster, tmp_path, capsys):
    # as many steps as the one-node test: the signal must land mid-run however slow the machine
    run, job = preempted_equals_uninterrupted(micro_run, tmp_path, capsys, *TWO_NODES)
    assert world_size(run, STEPS) == 2
    starts = [e for e in events(run) if e["event"] == "start"]
    assert [e["nodes"] for e in starts] == ["ldmnode[1-2]"] * 2 and job_field(job, "NumNodes") == "2"
    assert all(e["master"].startswith("ldmnode1:") for e in starts)
    log = full_log(run)
    assert log.count("Received 10 death signal") == 2, log[-4000:]  # both nodes' torchrun saved and stopped


def on_node(cluster, k: int, argv: list[str], env: dict) -> subprocess.Popen:
    """Start ``argv`` as on node ``k`` (its namespace and hosts file), like ssh to it."""
    return subprocess.Popen(["bash", str(LOCAL_SLURM), "exec", str(cluster), str(k), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_accelerate_launch_with_the_multi_node_yaml_across_the_two_hosts(micro_run, two_host_cluster, tmp_path):
    """The shipped ``launch/accelerate/multi_node.yaml`` as its header says to use it, one
    launcher per host (machine rank 0 on 10.77.N.1): 2 machines x 1 process train over gloo and
    end equal to a 2-rank torchrun run on one host."""
    subnet = (two_host_cluster / "netns").read_text().strip()
    common = [f"train.steps={LAUNCH_STEPS}", f"train.checkpoint_every={LAUNCH_STEPS}", "distributed.cpu=true"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="ldm0",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    def copy(name):
        run = tmp_path / name
        shutil.copytree(micro_run.cfg.path(micro_run.cfg.latents.dir), run / "latents")
        return run

    run = copy("accelerate")
    launchers = [
        on_node(two_host_cluster, k, [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "accelerate" / "multi_node.yaml"),
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(k - 1),
            "--main_process_ip", f"10.77.{subnet}.1", "--main_process_port", "29500",
            "-m", "ldm_train.cli", "train", "--config", str(MICRO), f"run.dir={run}", *common,
        ], env)
        for k in (1, 2)
    ]
    outputs = [p.communicate(timeout=JOB_CEILING)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    ref = copy("torchrun")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "ldm_train.cli", "train",
                           "--config", str(MICRO), f"run.dir={ref}", *common],
                          env={k: v for k, v in env.items() if k != "GLOO_SOCKET_IFNAME"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=JOB_CEILING)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert world_size(run, LAUNCH_STEPS) == world_size(ref, LAUNCH_STEPS) == 2  # one run over both hosts, not two of 1
    assert_bit_identical(final_weights(run, LAUNCH_STEPS), final_weights(ref, LAUNCH_STEPS))


def world_size(run, steps: int) -> int:
    return json.loads((run / "checkpoints" / f"step-{steps:07d}" / "state.json").read_text())["world_size"]
