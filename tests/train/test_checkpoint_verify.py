"""Verified checkpoints (one process): every file's sha256 in state.json, checked at load; a
damaged or missing file is named, and resuming falls back to the previous complete checkpoint;
a checkpoint of another strategy is refused naming both."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest

from ldm_train.train import checkpoint as ck

from conftest import copy_run
from test_resume import cli_train, loop, same, weights

COMMON = ("train.checkpoint_every=2", "train.keep_checkpoints=4")


def flip_a_bit(path, offset: int = -17) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture
def three_checkpoints(micro_run, micro_latents, tmp_path):
    """A run with checkpoints 2, 4, 6 (the loop, synchronous saves)."""
    run = tmp_path / "run"
    loop(micro_run, micro_latents, run, steps=6, checkpoint_every=2, async_save=False)
    return run


def test_state_json_records_every_files_sha256(three_checkpoints):
    ckpt = three_checkpoints / "checkpoints" / "step-0000006"
    state = json.loads((ckpt / "state.json").read_text())
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {"state.json"}
    assert set(state["files"]) == on_disk  # model, optimizer, EMA, rank state: all listed
    assert {"model.safetensors", "optimizer.pt", "rank-00000.safetensors"} <= on_disk
    for name, rec in state["files"].items():  # digests as any sha256 tool computes them
        assert rec["sha256"] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest(), name
        assert rec["bytes"] == (ckpt / name).stat().st_size
    assert state["digest"] == "sha256"
    assert ck.verify_checkpoint(ckpt) is True


@pytest.mark.parametrize("damage, words", [
    (lambda c: flip_a_bit(c / "model.safetensors"), "model.safetensors (its sha256 differs"),
    (lambda c: (c / "rank-00000.safetensors").write_bytes((c / "rank-00000.safetensors").read_bytes()[:-40]),
     "rank-00000.safetensors ("),
    (lambda c: (c / "rank-00000.safetensors").unlink(), "rank-00000.safetensors (missing)"),
    (lambda c: (c / "state.json").write_text((c / "state.json").read_text().replace('"step": 6', '"step": 7')),
     "state.json (its content differs"),
    (lambda c: (c / "state.json").write_text((c / "state.json").read_text()[:-30]), "state.json is not valid JSON"),
], ids=["bit-flip", "truncated", "missing-rank-file", "edited-state", "truncated-state"])
def test_a_damaged_file_is_named(three_checkpoints, damage, words):
    ckpt = three_checkpoints / "checkpoints" / "step-0000006"
    damage(ckpt)
    with pytest.raises(ck.CheckpointCorrupt, match="step-0000006") as e:
        ck.pick_checkpoint(three_checkpoints / "checkpoints", 6)
    assert words in str(e.value)


def test_sizes_only_still_names_a_truncated_or_missing_file(three_checkpoints):
    ckpt = three_checkpoints / "checkpoints" / "step-0000004"
    flip_a_bit(ckpt / "optimizer.pt")
    assert ck.verify_checkpoint(ckpt, contents=False) is True  # a same-size change needs the digest
    (ckpt / "ema-00000-of-00001.safetensors").unlink()
    with pytest.raises(ck.CheckpointCorrupt, match=r"ema-00000-of-00001\.safetensors \(missing\)"):
        ck.verify_checkpoint(ckpt, contents=False)


def test_resume_skips_a_damaged_latest_checkpoint_and_says_so(micro_run, tmp_path, capsys, caplog):
    """The latest checkpoint (6) has a flipped bit, the one before (4) a truncated rank file: the
    rerun warns about both, resumes from 2 and ends equal to the uninterrupted run."""
    whole = copy_run(micro_run, tmp_path / "whole")
    assert cli_train(whole, "train.steps=8", *COMMON) == 0
    run = copy_run(micro_run, tmp_path / "run")
    assert cli_train(run, "train.steps=8", *COMMON) == 0
    shutil.rmtree(run / "checkpoints" / "step-0000008")
    flip_a_bit(run / "checkpoints" / "step-0000006" / "model.safetensors")
    rank_file = run / "checkpoints" / "step-0000004" / "rank-00000.safetensors"
    rank_file.write_bytes(rank_file.read_bytes()[:100])
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger=ck.__name__):
        assert cli_train(run, "train.steps=8", *COMMON) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed_from"].endswith("step-0000002")
    told = caplog.text
    assert "step-0000006 is damaged: model.safetensors" in told and "step-0000004 is damaged: rank-00000.safetensors" in told
    assert "resuming from" in told and "step-0000002" in told
    assert same(weights(whole, 8), weights(run, 8))
    assert ck.verify_checkpoint(run / "checkpoints" / "step-0000006")  # rewritten by the resumed run


def test_every_checkpoint_damaged_is_a_clear_error(micro_run, tmp_path, capsys):
    run = copy_run(micro_run, tmp_path / "run")
    assert cli_train(run, "train.steps=4", "train.checkpoint_every=2") == 0
    for ckpt in ck.list_checkpoints(run / "checkpoints"):
        flip_a_bit(ckpt / "model.safetensors")
    capsys.readouterr()
    assert cli_train(run, "train.steps=4", "train.checkpoint_every=2") == 2
    err = capsys.readouterr().err
    assert "no checkpoint under" in err and "verifies" in err and "--overwrite" in err and "Traceback" not in err


def test_a_checkpoint_of_another_strategy_is_refused_naming_both(micro_run, tmp_path, capsys):
    run = copy_run(micro_run, tmp_path / "run")
    assert cli_train(run, "train.steps=4", "train.checkpoint_every=2") == 0
    capsys.readouterr()
    assert cli_train(run, "train.steps=4", "train.checkpoint_every=2", "distributed.strategy=zero3") == 2
    err = capsys.readouterr().err
    assert "distributed.strategy (ddp there, zero3 now)" in err and "Traceback" not in err


def test_old_checkpoints_without_digests_still_resume(micro_run, micro_latents, tmp_path, caplog):
    run = tmp_path / "run"
    loop(micro_run, micro_latents, run, steps=4, checkpoint_every=2)
    state_file = run / "checkpoints" / "step-0000004" / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("files", "digest", "state_sha256"):
        del state[key]
    state_file.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger=ck.__name__):
        assert ck.resume_checkpoint(run / "checkpoints").name == "step-0000004"
    assert "predates recorded digests" in caplog.text
