"""A real Slurm for the Slurm tests, started by ``launch/slurm_local.sh`` in a temporary folder and
stopped (only its own daemons, by PID, and its own network namespaces) at the end: one node for
the session, and two hosts (two network namespaces) for the modules that ask for them. Skipped,
with the reason, only where Slurm is not installed or cannot run (not root), and the two hosts
only where network namespaces cannot be made (no CAP_NET_ADMIN: the script's exit code 4)."""
from __future__ import annotations

import os
import subprocess

import pytest
from .slurm_helpers import LOCAL_SLURM, unavailable


NO_NETNS = 4  # launch/slurm_local.sh --hosts 2: network devices cannot be created here


def running_cluster(folder, *args: str):
    """Start ``slurm_local.sh`` in ``folder``; yield it with SLURM_CONF pointing at it; stop it."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(["bash", str(LOCAL_SLURM), "start", str(folder), *args], capture_output=True, text=True, timeout=300)
    if proc.returncode == NO_NETNS:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, f"local Slurm did not start:\n{proc.stdout}\n{proc.stderr}"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield folder
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(folder)], capture_output=True, text=True, timeout=300)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The folder of a running one-node local Slurm; SLURM_CONF points at it for the session."""
    yield from running_cluster(tmp_path_factory.mktemp("slurm"))


@pytest.fixture(scope="module")
def two_host_cluster(tmp_path_factory):
    """A two-node local Slurm, each node a network namespace (``slurm_local.sh --hosts 2``);
    SLURM_CONF points at it for the module (then back at the session's one-node cluster)."""
    yield from running_cluster(tmp_path_factory.mktemp("slurm2"), "--hosts", "2")
