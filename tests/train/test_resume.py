"""One process: exact resume through the CLI, crashes and signals during saves, the non-finite
guard, the watchdog, telemetry, and the DeepSpeed config built from the typed sections."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from ldm_train.cli import main
from ldm_train.config import load_config
from ldm_train.diffusion import build_objective
from ldm_train.errors import Preempted
from ldm_train.train import checkpoint as ck
from ldm_train.train.batches import MemoryBatches
from ldm_train.train.control import NonFiniteError, Watchdog
from ldm_train.train.loop import make_accelerator, train_denoiser
from ldm_train.train.strategy import deepspeed_config
from ldm_train.train.telemetry import forward_flops
from ldm_train.utils.runs import MetricsLog

from conftest import MICRO, REPO, copy_run


def cli_train(run, *overrides) -> int:
    return main(["train", "--config", str(MICRO), f"run.dir={run}", "distributed.cpu=true", *overrides])


def weights(run, step, which="model"):
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / f"{which}.safetensors"))


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def loop(micro_run, micro_latents, run, objective=None, resume_from=None, **train):
    cfg = micro_run.cfg
    tc = cfg.train.model_copy(update={"log_every": 1, **train})
    return train_denoiser(
        model=cfg.model, diffusion=cfg.diffusion, train=tc, distributed=cfg.distributed,
        accelerator=make_accelerator(cfg.distributed), batches=MemoryBatches(micro_latents, tc.batch_size, 0, 0),
        run_dir=run, seed=0, log=MetricsLog(run / "metrics.jsonl"), resume_from=resume_from, objective=objective,
    )


def test_cli_rerun_resumes_and_may_extend_steps_but_not_change_the_run(micro_run, tmp_path, capsys):
    whole = copy_run(micro_run, tmp_path / "whole")
    assert cli_train(whole, "train.steps=8", "train.checkpoint_every=4", "train.ema_decays=[0.9,0.99]") == 0
    cut = copy_run(micro_run, tmp_path / "cut")
    # the first half; the schedule's length is train.steps, so cut the run by deleting, not by steps=4
    assert cli_train(cut, "train.steps=8", "train.checkpoint_every=4", "train.ema_decays=[0.9,0.99]") == 0
    shutil.rmtree(cut / "checkpoints" / "step-0000008")
    capsys.readouterr()
    assert cli_train(cut, "train.steps=8", "train.checkpoint_every=4", "train.ema_decays=[0.9,0.99]") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed_from"].endswith("step-0000004")
    for which in ("model", "ema-00000-of-00001"):
        assert same(weights(whole, 8, which), weights(cut, 8, which))
    assert json.loads((cut / "status.json").read_text())["state"] == "finished"
    # training longer is a resume; changing what is trained is refused, naming the key
    assert cli_train(cut, "train.steps=10", "train.checkpoint_every=4", "train.ema_decays=[0.9,0.99]") == 0
    assert ck.read_state(ck.latest_checkpoint(cut / "checkpoints"))["step"] == 10
    assert cli_train(cut, "train.steps=12", "train.lr=0.5", "train.ema_decays=[0.9,0.99]") == 2
    assert "train.lr" in capsys.readouterr().err
    # --overwrite starts over
    assert cli_train(cut, "train.steps=2", "--overwrite") == 0
    assert [p.name for p in ck.list_checkpoints(cut / "checkpoints")] == ["step-0000002"]


def test_resume_from_more_processes_names_a_missing_rank_file(micro_run, tmp_path, capsys):
    """A checkpoint's state.json says 4 processes saved it; an elastic resume reads every old
    rank's file (the data position), so the missing ones are named, without a traceback."""
    run = copy_run(micro_run, tmp_path / "run")
    assert cli_train(run, "train.steps=4", "train.checkpoint_every=2") == 0
    latest = ck.latest_checkpoint(run / "checkpoints")
    shutil.rmtree(latest)  # so that the rerun resumes from step 2
    state_file = run / "checkpoints" / "step-0000002" / "state.json"
    state = json.loads(state_file.read_text())
    edited = {k: v for k, v in dict(state, world_size=4).items() if k != "files"}
    ck.write_state(state_file.parent, edited, state["files"])  # re-signed: an edit, not damage
    capsys.readouterr()
    assert cli_train(run, "train.steps=4", "train.checkpoint_every=2") == 2
    err = capsys.readouterr().err
    assert "saved by 4 ranks but has no rank-00001.safetensors, rank-00002.safetensors, rank-00003.safetensors" in err
    assert "Traceback" not in err


def test_resume_with_another_model_config_is_still_refused(micro_run, tmp_path, capsys):
    run = copy_run(micro_run, tmp_path / "run")
    assert cli_train(run, "train.steps=2", "train.checkpoint_every=2") == 0
    capsys.readouterr()
    assert cli_train(run, "train.steps=4", "model.block_out_channels=[16,16]") == 2
    assert "model.block_out_channels" in capsys.readouterr().err


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_loadable(micro_run, micro_latents, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save_ema, calls = ck.save_ema, []

    def crashing_save_ema(folder, ema, rank):
        calls.append(folder.name)
        if len(calls) == 2:
            raise RuntimeError("simulated crash during the save")
        real_save_ema(folder, ema, rank)

    monkeypatch.setattr(ck, "save_ema", crashing_save_ema)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop(micro_run, micro_latents, run, steps=6, checkpoint_every=2)
    assert calls == ["step-0000002.tmp", "step-0000004.tmp"]
    assert ck.latest_checkpoint(run / "checkpoints").name == "step-0000002"
    assert (run / "checkpoints" / "step-0000004.tmp").is_dir()  # what the crash left behind
    monkeypatch.setattr(ck, "save_ema", real_save_ema)
    _, _, result = loop(micro_run, micro_latents, run, steps=6, checkpoint_every=2,
                        resume_from=ck.latest_checkpoint(run / "checkpoints"))
    assert result.resumed_from.name == "step-0000002"
    assert not list((run / "checkpoints").glob("*.tmp"))  # cleared by the next save
    whole = tmp_path / "whole"
    loop(micro_run, micro_latents, whole, steps=6, checkpoint_every=2)
    assert same(weights(whole, 6), weights(run, 6))


def test_signal_then_second_signal_during_the_save(micro_run, micro_latents, tmp_path, monkeypatch):
    """SIGUSR1 at step 3 stops after step 3 with a checkpoint; a SIGTERM arriving while that
    checkpoint is written does not interrupt it; resuming equals the uninterrupted run."""
    cfg = micro_run.cfg
    base, calls = build_objective(cfg.diffusion), []

    def signalling(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return base(*args)

    real_save_weights = ck.save_model_weights

    def signalled_save(folder, tensors):
        os.kill(os.getpid(), signal.SIGTERM)  # the second signal, mid-save
        real_save_weights(folder, tensors)

    monkeypatch.setattr(ck, "save_model_weights", signalled_save)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="after step 3"):
        loop(micro_run, micro_latents, run, objective=signalling, steps=8, checkpoint_every=100)
    assert [p.name for p in ck.list_checkpoints(run / "checkpoints")] == ["step-0000003"]
    assert ck.read_state(run / "checkpoints" / "step-0000003")["step"] == 3
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    monkeypatch.setattr(ck, "save_model_weights", real_save_weights)
    loop(micro_run, micro_latents, run, steps=8, checkpoint_every=100, resume_from=run / "checkpoints" / "step-0000003")
    whole = tmp_path / "whole"
    loop(micro_run, micro_latents, whole, steps=8, checkpoint_every=100)
    assert same(weights(whole, 8), weights(run, 8))


def nan_objective(micro_run, bad_calls):
    base, calls = build_objective(micro_run.cfg.diffusion), []

    def objective(*args):
        calls.append(1)
        loss, stats = base(*args)
        if len(calls) in bad_calls:
            loss = loss * float("nan")
        return loss, stats

    return objective


def test_a_nan_step_is_skipped_and_counted(micro_run, micro_latents, tmp_path):
    run = tmp_path / "run"
    model, _, result = loop(micro_run, micro_latents, run, objective=nan_objective(micro_run, {3}), steps=6, checkpoint_every=3)
    assert result.nonfinite_skipped == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = ck.read_state(ck.latest_checkpoint(run / "checkpoints"))
    assert state["nonfinite_skipped"] == 1 and state["step"] == 6
    assert state["ema"]["num_updates"] == 5  # no EMA update from the skipped step
    records = [r for r in MetricsLog(run / "metrics.jsonl").read() if r.get("stage") == "train"]
    assert math.isnan(records[2]["grad_norm"]) and records[-1]["nonfinite_skipped"] == 1


def test_k_nonfinite_steps_in_a_row_stop_with_the_last_good_checkpoint(micro_run, micro_latents, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row") as err:
        loop(micro_run, micro_latents, run, objective=nan_objective(micro_run, set(range(3, 100))),
             steps=20, checkpoint_every=2, max_nonfinite_steps=3)
    assert "train.max_nonfinite_steps" in str(err.value)
    latest = ck.latest_checkpoint(run / "checkpoints")
    assert latest.name == "step-0000004"  # saved at step 4: the weights of step 2, untouched since
    assert all(torch.isfinite(v).all() for v in ck.load_weights(latest, "model").values())
    assert same(ck.load_weights(latest, "model"), ck.load_weights(run / "checkpoints" / "step-0000002", "model"))


def test_watchdog_reports_a_stalled_rank_once_per_stall():
    reports, arrived = [], threading.Event()

    def report(msg):
        reports.append(msg)
        arrived.set()

    dog = Watchdog(0.2, rank=1, report=report)
    dog.beat(41)
    assert arrived.wait(120)
    dog.close()
    assert len(reports) == 1 and "rank 1" in reports[0] and "step 42" in reports[0]


def test_metrics_tensorboard_and_mfu(micro_run, micro_latents, tmp_path):
    run = tmp_path / "run"
    loop(micro_run, micro_latents, run, steps=3, peak_tflops=1.0)
    rec = [r for r in MetricsLog(run / "metrics.jsonl").read() if r.get("stage") == "train"][-1]
    for key in ("loss", "grad_norm", "lr", "img_per_s", "step_time", "data_time", "compute_time", "cpu_rss_gib"):
        assert key in rec and rec[key] >= 0, key
    assert 0 < rec["mfu"] < 1
    assert rec["step_time"] == pytest.approx(rec["data_time"] + rec["compute_time"], abs=1e-4)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_forward_flops_scale_with_batch_and_resolution(micro_run):
    m = micro_run.cfg.model
    one = forward_flops(m, [4, 8, 8], [16, 32], batch=1)
    assert one > 0
    assert forward_flops(m, [4, 8, 8], [16, 32], batch=4) == 4 * one
    bigger = forward_flops(m, [4, 16, 16], [16, 32], batch=1)
    assert 3.0 * one < bigger < 5.0 * one  # ~4x the pixels; attention grows faster, the rest linearly


def test_deepspeed_config_from_the_typed_sections(tmp_path):
    cfg = load_config(MICRO, ["distributed.strategy=zero3", "distributed.offload_optimizer=true", "distributed.offload_params=true",
                              "distributed.mixed_precision=bf16", "distributed.gradient_accumulation_steps=4", "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg.distributed, cfg.train)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.batch_size and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True} and not ds["fp16"]["enabled"]
    base = tmp_path / "ds.json"
    base.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, "stage": 1}, "train_micro_batch_size_per_gpu": 999}))
    cfg2 = load_config(MICRO, ["distributed.strategy=zero2", f"distributed.deepspeed_config={base}"])
    ds2 = deepspeed_config(cfg2.distributed, cfg2.train)
    assert ds2["zero_optimization"] == {"overlap_comm": True, "stage": 2}  # kept, but the stage is ours
    assert ds2["train_micro_batch_size_per_gpu"] == cfg2.train.batch_size


@pytest.mark.parametrize("overrides, words", [
    (["distributed.offload_params=true"], "needs distributed.strategy=zero3"),
    (["distributed.offload_optimizer=true"], "needs a ZeRO strategy"),
    (["distributed.strategy=zero2", "distributed.deepspeed_config=/nonexistent/ds.json"], "no such file"),
    (["distributed.strategy=zero5"], "distributed.strategy"),
])
def test_bad_strategy_settings_are_refused_cleanly(micro_run, tmp_path, capsys, overrides, words):
    run = copy_run(micro_run, tmp_path / "run")
    assert cli_train(run, "train.steps=1", *overrides) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_deepspeed_json_naming_an_optimizer_is_refused(micro_run, tmp_path, capsys):
    run = copy_run(micro_run, tmp_path / "run")
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    assert cli_train(run, "train.steps=1", "distributed.strategy=zero2", f"distributed.deepspeed_config={bad}") == 2
    assert "remove 'optimizer'" in capsys.readouterr().err



def test_streamed_batches_resume_exactly_with_another_worker_count(micro_run, tmp_path, capsys):
    """train.data_source=stream: 8 steps of 8 over 24 samples cross epochs; cut at step 4 and
    resumed with 2 loader workers instead of 0, the weights equal the uninterrupted run's."""
    common = ["train.steps=8", "train.checkpoint_every=4", "train.data_source=stream", "latents.loader.shuffle_buffer=8"]
    whole = copy_run(micro_run, tmp_path / "whole")
    assert cli_train(whole, *common, "latents.loader.num_workers=0") == 0
    cut = copy_run(micro_run, tmp_path / "cut")
    assert cli_train(cut, *common, "latents.loader.num_workers=0") == 0
    shutil.rmtree(cut / "checkpoints" / "step-0000008")
    capsys.readouterr()
    assert cli_train(cut, *common, "latents.loader.num_workers=2") == 0
    assert json.loads(capsys.readouterr().out)["resumed_from"].endswith("step-0000004")
    assert same(weights(whole, 8), weights(cut, 8))
    _, meta = ck.read_rank_state(cut / "checkpoints" / "step-0000008", 0)
    assert meta["data"]["source"] == "stream" and meta["data"]["loader"]["position"] == 64
    memory = copy_run(micro_run, tmp_path / "memory")  # a different sample order: different weights
    assert cli_train(memory, "train.steps=8", "train.checkpoint_every=4") == 0
    assert not same(weights(whole, 8), weights(memory, 8))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_deepspeed_jsons_are_valid_bases(stage):
    path = REPO / "launch" / "deepspeed" / f"zero{stage}.json"
    cfg = load_config(MICRO, [f"distributed.strategy=zero{stage}", f"distributed.deepspeed_config={path}"])
    ds = deepspeed_config(cfg.distributed, cfg.train)
    assert ds["zero_optimization"]["stage"] == stage
    assert json.loads(path.read_text())["zero_optimization"]["stage"] == stage  # the file says what it is for


@pytest.mark.parametrize("extra", [
    ["distributed.gradient_accumulation_steps=2"],
    ["distributed.mixed_precision=fp16"],  # Accelerate's grad scaler state is part of the checkpoint
    ["distributed.mixed_precision=bf16", "distributed.ema_sharded=true"],
])
def test_resume_is_exact_with_accumulation_and_mixed_precision(micro_run, tmp_path, capsys, extra):
    """Each run in its own process: Accelerate's state (the precision) is fixed per process."""
    common = ["train.steps=6", "train.checkpoint_every=3", *extra]

    def train(run):
        cmd = [sys.executable, "-m", "ldm_train.cli", "train", "--config", str(MICRO), f"run.dir={run}",
               "distributed.cpu=true", *common]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]

    whole = copy_run(micro_run, tmp_path / "whole")
    train(whole)
    cut = copy_run(micro_run, tmp_path / "cut")
    train(cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    train(cut)
    assert same(weights(whole, 6), weights(cut, 6))
    assert same(weights(whole, 6, "ema-00000-of-00001"), weights(cut, 6, "ema-00000-of-00001"))
    state = ck.read_state(cut / "checkpoints" / "step-0000006")
    gas = 2 if "distributed.gradient_accumulation_steps=2" in extra else 1
    assert state["samples_seen"] == 6 * micro_run.cfg.train.batch_size * gas
    if "distributed.mixed_precision=fp16" in extra and torch.cuda.is_available():  # Accelerate scales on GPUs only
        assert state["grad_scaler"]["scale"] > 0


def test_milestones_survive_pruning(micro_run, micro_latents, tmp_path):
    run = tmp_path / "run"
    loop(micro_run, micro_latents, run, steps=7, checkpoint_every=1, keep_checkpoints=2, milestones=[2, 3])
    assert [p.name for p in ck.list_checkpoints(run / "checkpoints")] == [
        "step-0000002", "step-0000003", "step-0000006", "step-0000007"
    ]
