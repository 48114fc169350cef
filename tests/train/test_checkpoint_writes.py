"""Writing checkpoints (one process): a disk that fills up during a save (a tmpfs this test mounts)
gives a clear error, removes the partial save and leaves the previous checkpoint loadable; the
background writer (train.async_save) publishes the same bytes as a synchronous save, waits for a
save in flight before the next, and raises its errors in the training thread."""
from __future__ import annotations

import shutil
import subprocess
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm_train.train import checkpoint as ck

from test_resume import loop, same, weights


def mount_tmpfs(where, size_bytes: int) -> None:
    where.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A filesystem this test mounts and unmounts, sized later (``mount(size)`` returns its path)."""
    where, mounted = tmp_path / "small", []

    def mount(size_bytes: int):
        mount_tmpfs(where, size_bytes)
        mounted.append(where)
        return where

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


def checkpoint_bytes(ckpt) -> int:
    return sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_disk_that_fills_up_during_a_save(micro_run, micro_latents, tmp_path, small_disk, async_save, capsys):
    """Room for the checkpoint of step 2 and half another: the save of step 4 runs out of space."""
    whole = tmp_path / "whole"
    loop(micro_run, micro_latents, whole, steps=4, checkpoint_every=2, tensorboard=False, async_save=async_save)
    size = checkpoint_bytes(whole / "checkpoints" / "step-0000002")
    disk = small_disk(int(1.5 * size) + 64 * 1024)  # + metrics.jsonl and the folders
    run = disk / "run"
    with pytest.raises(ck.CheckpointWriteError) as e:
        loop(micro_run, micro_latents, run, steps=4, checkpoint_every=2, tensorboard=False, async_save=async_save)
    message = str(e.value)
    assert "step 4 not saved" in message and "no space left on device (ENOSPC)" in message
    assert "step-0000004.tmp" in message and "the previous checkpoint" in message  # names the file it was writing
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]  # the partial one removed
    previous = run / "checkpoints" / "step-0000002"
    assert ck.verify_checkpoint(previous)  # intact: every digest matches
    # and loadable: moved to a disk with room, it resumes to the uninterrupted result
    moved = tmp_path / "moved"
    shutil.copytree(run / "checkpoints", moved / "checkpoints")
    loop(micro_run, micro_latents, moved, steps=4, checkpoint_every=2, tensorboard=False,
         resume_from=ck.resume_checkpoint(moved / "checkpoints"))
    assert same(weights(whole, 4), weights(moved, 4))


def contents(path):
    """What a file holds: tensors and metadata (safetensors writes its metadata map in no fixed
    order, so equal checkpoints need not be equal bytes), or the optimizer's state."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return f.metadata(), load_file(str(path))
    return torch.load(path, weights_only=True)


def test_async_and_sync_saves_hold_the_same_state(micro_run, micro_latents, tmp_path):
    runs = {}
    for mode in (True, False):
        runs[mode] = tmp_path / f"async-{mode}"
        loop(micro_run, micro_latents, runs[mode], steps=6, checkpoint_every=2, tensorboard=False, async_save=mode)
    for step in (2, 4, 6):
        folders = [runs[m] / "checkpoints" / f"step-{step:07d}" for m in (True, False)]
        states = [ck.read_state(f) for f in folders]
        assert states[0]["files"].keys() == states[1]["files"].keys()
        assert {k: v for k, v in states[0].items() if k not in ("files", "state_sha256")} == \
            {k: v for k, v in states[1].items() if k not in ("files", "state_sha256")}
        for name in states[0]["files"]:  # the background writer saw the state of its step, not a later one
            a, b = (contents(f / name) for f in folders)
            assert _equal(a, b), (step, name)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_a_second_save_waits_for_the_first_and_writer_errors_reach_the_loop(micro_run, micro_latents, tmp_path,
                                                                            monkeypatch):
    """The writer of step 2 is held until the loop has trained steps 3 and 4 and asks for the next
    save, which waits for it (step 4 is begun only after step 2 is published). Then a bug in the
    writer (step 6) is raised in the training thread, as it is, not swallowed."""
    from ldm_train.train import loop as loop_module

    root = tmp_path / "run" / "checkpoints"
    real_ema, real_begin, real_save = ck.save_ema, ck.begin_save, loop_module.save_training_state
    release, events = threading.Event(), []

    def held_save_ema(folder, ema, rank):
        if folder.name == "step-0000002.tmp":
            assert release.wait(timeout=600), "the training thread never reached step 4"
        if folder.name == "step-0000006.tmp":
            raise RuntimeError("a bug in the writer")
        real_ema(folder, ema, rank)

    def begin_save(ckpt_root, step):
        events.append(("begin", step, [p.name for p in ck.list_checkpoints(ckpt_root)]))
        return real_begin(ckpt_root, step)

    def save(parts, *args, **kwargs):
        events.append(("save", parts.counters.step, [p.name for p in ck.list_checkpoints(root)]))
        if parts.counters.step == 4:
            release.set()  # let step 2's writer go: this save waits for it before it begins
        return real_save(parts, *args, **kwargs)

    monkeypatch.setattr(ck, "save_ema", held_save_ema)
    monkeypatch.setattr(ck, "begin_save", begin_save)
    monkeypatch.setattr(loop_module, "save_training_state", save)
    with pytest.raises(RuntimeError, match="a bug in the writer"):
        loop(micro_run, micro_latents, tmp_path / "run", steps=8, checkpoint_every=2, tensorboard=False,
             async_save=True)
    assert events[:4] == [
        ("save", 2, []), ("begin", 2, []),
        ("save", 4, []),  # trained on to step 4 while step 2 was still being written
        ("begin", 4, ["step-0000002"]),  # the second save began once the first was published
    ]
    assert events[4][:2] == ("save", 6) and events[5] == ("begin", 6, ["step-0000002", "step-0000004"])
    assert [p.name for p in ck.list_checkpoints(root)] == ["step-0000002", "step-0000004"]
