"""A real single-node Slurm for the Slurm tests, started once per session by
``launch/slurm_local.sh`` in a temporary folder and stopped (only its own daemons, by PID) at the
end. Skipped, with the reason, only where Slurm is not installed or cannot run (not root)."""
from __future__ import annotations

import os
import subprocess

import pytest
from .slurm_helpers import LOCAL_SLURM, unavailable


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The folder of a running local Slurm; SLURM_CONF points at it for the session."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", str(LOCAL_SLURM), "start", str(folder)], capture_output=True, text=True, timeout=300)
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
