"""Writing checkpoints with two ranks (torchrun, gloo on the CPU): a disk that fills up during a
save, whichever rank's write meets it (DeepSpeed's partitioned states in the training thread, or
the writer's files), stops both ranks with the same clear error instead of hanging one of them,
removes the partial save and leaves the previous checkpoint intact and resumable."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from conftest import copy_run
from test_checkpoint_writes import checkpoint_bytes, small_disk  # noqa: F401 (a fixture)
from test_distributed import assert_same, env, final_state, run_ok, train_cmd

from ldm_train.train import checkpoint as ck

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.mark.parametrize("strategy, async_save", [("zero2", False)], ids=["zero2"])
def test_a_disk_that_fills_up_during_a_two_rank_save(micro_run, tmp_path, small_disk, strategy, async_save):  # noqa: F811
    """Room for the checkpoint of step 2 and half another: the save of step 4 runs out of space."""
    common = ["train.steps=4", "train.checkpoint_every=2", "train.tensorboard=false", "train.keep_checkpoints=3",
              f"distributed.strategy={strategy}", f"train.async_save={str(async_save).lower()}"]
    whole = copy_run(micro_run, tmp_path / "whole")
    run_ok(train_cmd(whole, *common), tmp_path)
    size = checkpoint_bytes(whole / "checkpoints" / "step-0000002")
    disk = small_disk(int(1.5 * size) + 64 * 1024 + checkpoint_bytes(whole / "latents"))
    run = copy_run(micro_run, disk / "run")

    proc = subprocess.run(train_cmd(run, *common), capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env())
    # one line from each rank that gets to print it: a line may follow a progress bar's last "\r"
    # frame, and torchrun SIGTERMs the other rank as soon as one exits with its error, so whether
    # the second line appears is a race. No hang: the timeout; no rank's traceback: no frame of ours.
    errors = re.findall(r"ldm-train train: error: [^\r\n]*", proc.stderr)
    assert proc.returncode != 0 and 1 <= len(errors) <= 2, proc.stderr[-4000:]
    assert not re.search(r'File "[^"]*ldm_train[/\\]', proc.stderr), proc.stderr[-4000:]
    for line in errors:
        assert "step 4 not saved" in line and "no space left on device (ENOSPC)" in line, line
        assert "step-0000004.tmp" in line and "the previous checkpoint" in line, line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]  # the partial one removed
    assert ck.verify_checkpoint(run / "checkpoints" / "step-0000002")  # intact: every digest matches
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    # and resumable: moved to a disk with room, both ranks finish equal to the uninterrupted run
    moved = copy_run(micro_run, tmp_path / "moved")
    shutil.copytree(run / "checkpoints", moved / "checkpoints")
    out = run_ok(train_cmd(moved, *common), tmp_path)
    summary, _ = json.JSONDecoder().raw_decode(out.stdout[out.stdout.index("{"):])
    assert summary["resumed_from"] == str(moved / "checkpoints" / "step-0000002")
    assert_same(final_state(whole, 4), final_state(moved, 4))
