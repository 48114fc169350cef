"""Two DDP processes on a machine without a GPU are one distributed run whether or not
``distributed.cpu`` is set: Accelerate given ``cpu=False`` there reports ``DistributedType.NO``,
which would leave the model unwrapped (no gradient all-reduce) and ``wait_for_everyone`` a no-op."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

PROBE = """
import sys, torch.distributed as dist
from ldm_train.config import DistributedConfig, TrainConfig
from ldm_train.train.strategy import make_accelerator
acc = make_accelerator(DistributedConfig(cpu=sys.argv[1] == "true"), TrainConfig())
print(f"rank {acc.process_index}: {acc.distributed_type.name} {acc.num_processes}", flush=True)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without a GPU")
@pytest.mark.parametrize("cpu", ["true", "false"])
def test_two_cpu_processes_are_a_distributed_run(tmp_path, cpu):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(probe), cpu], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the two processes share the pipe, so their lines may interleave: find the reports, not lines
    reports = sorted(re.findall(r"rank \d: \w+ \d", proc.stdout))
    assert reports == ["rank 0: MULTI_CPU 2", "rank 1: MULTI_CPU 2"], proc.stdout
