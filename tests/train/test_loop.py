"""The denoiser training loop on the micro latent cache: learning, checkpoints, EMA, determinism."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ldm_train.config import LRScheduleConfig
from ldm_train.latents.cache import LatentData
from ldm_train.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_optimizer_state,
    load_weights,
    read_state,
)
from ldm_train.train.batches import MemoryBatches
from ldm_train.train.loop import make_accelerator, train_denoiser
from ldm_train.utils.lr import warmup_cosine
from ldm_train.utils.runs import MetricsLog


def fixed_subset(data: LatentData, n: int = 8) -> LatentData:
    return LatentData(
        data.mean[:n], data.std[:n], data.context[:n], data.captions[:n], data.keys[:n], data.null_context, data.manifest
    )


def train(micro_run, data, run_dir, seed=0, **train_overrides):
    cfg = micro_run.cfg
    tc = cfg.train.model_copy(update=train_overrides)
    log = MetricsLog(run_dir / "metrics.jsonl")
    acc = make_accelerator(cfg.distributed)
    model, ema, result = train_denoiser(
        model=cfg.model, diffusion=cfg.diffusion, train=tc, distributed=cfg.distributed, accelerator=acc,
        batches=MemoryBatches(data, tc.batch_size, seed, acc.process_index), run_dir=run_dir, seed=seed, log=log,
    )
    return model, ema, result, log


@pytest.fixture(scope="module")
def fixed_batch_run(micro_run, micro_latents, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("loop") / "run"
    data = fixed_subset(micro_latents)
    model, ema, result, log = train(
        micro_run, data, run_dir, steps=40, batch_size=8, lr=1e-3, lr_schedule=LRScheduleConfig(warmup_steps=5), log_every=1, checkpoint_every=10
    )
    return run_dir, model, ema, result, log


def test_loss_goes_down_on_a_fixed_batch(fixed_batch_run):
    _, _, _, result, _ = fixed_batch_run
    assert [s for s, _ in result.losses] == list(range(40))
    values = [v for _, v in result.losses]
    assert all(math.isfinite(v) for v in values)
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    assert result.final_loss == pytest.approx(last)
    assert result.steps == 40


def test_metrics_log_records_every_logged_step(fixed_batch_run):
    _, _, _, result, log = fixed_batch_run
    records = [r for r in log.read() if r.get("stage") == "train"]
    assert [r["step"] for r in records] == list(range(40))
    assert [r["loss"] for r in records] == [v for _, v in result.losses]
    # warm-up: linear up to the peak lr over 5 steps, then cosine decay to 10% of it
    assert records[0]["lr"] == pytest.approx(1e-3 * 2 / 5)
    assert max(r["lr"] for r in records) == pytest.approx(1e-3)
    assert records[-1]["lr"] == pytest.approx(1e-4, rel=1e-6)


def test_only_last_three_checkpoints_kept(fixed_batch_run):
    run_dir, _, _, result, _ = fixed_batch_run
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in ckpts] == ["step-0000020", "step-0000030", "step-0000040"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [p.name for p in ckpts]
    assert result.checkpoint == ckpts[-1] == latest_checkpoint(run_dir / "checkpoints")


def test_checkpoint_contents(fixed_batch_run):
    run_dir, model, ema, _, _ = fixed_batch_run
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "ema-00000-of-00001.safetensors", "model.safetensors", "optimizer.pt", "rank-00000.safetensors", "state.json"
    ]
    raw = load_weights(ckpt, "model")
    assert raw.keys() == model.state_dict().keys()
    assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items())
    ema_w = load_weights(ckpt, "ema")
    full = ema.full_weights()
    assert ema_w.keys() == full.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(ema_w[k], v) for k, v in full.items())
    assert all(torch.equal(ema_w[k], v) for k, v in load_weights(ckpt).items())  # "ema" is the default
    assert any(not torch.equal(ema_w[k], raw[k]) for k in ema_w)  # EMA is not the raw model

    state = read_state(ckpt)
    assert state["step"] == 40 and state["ema"] == {"decays": [0.999], "num_updates": 40, "world": 1}
    assert state["samples_seen"] == 40 * 8 and state["world_size"] == 1 and state["strategy"] == "ddp"
    assert state["lr_scheduler"]["last_epoch"] == 40
    assert json.loads((ckpt / "state.json").read_text()) == state

    opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    assert opt.keys() == load_optimizer_state(ckpt).keys() == {"state", "param_groups"}
    assert len(opt["state"]) == len(list(model.parameters()))
    assert opt["param_groups"][0]["lr"] == pytest.approx(1e-4, rel=1e-6)
    assert int(opt["state"][0]["step"]) == 40

    older = list_checkpoints(run_dir / "checkpoints")[0]
    assert read_state(older)["step"] == 20
    with pytest.raises(FileNotFoundError):
        load_weights(ckpt, "nothing")


def test_same_seed_bitwise_identical_different_seed_not(micro_run, micro_latents, tmp_path):
    data = fixed_subset(micro_latents)
    kw = dict(steps=4, batch_size=4, log_every=1, checkpoint_every=100)
    a, ema_a, ra, _ = train(micro_run, data, tmp_path / "a", seed=5, **kw)
    b, ema_b, rb, _ = train(micro_run, data, tmp_path / "b", seed=5, **kw)
    c, _, rc, _ = train(micro_run, data, tmp_path / "c", seed=6, **kw)
    assert ra.losses == rb.losses
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    for k, v in ema_a.full_weights().items():
        assert torch.equal(v, ema_b.full_weights()[k]), k
    assert ra.losses != rc.losses
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    # the saved files agree bit for bit too
    fa = load_file(str(ra.checkpoint / "model.safetensors"))
    fb = load_file(str(rb.checkpoint / "model.safetensors"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_final_step_always_checkpointed(micro_run, micro_latents, tmp_path):
    _, _, result, _ = train(micro_run, fixed_subset(micro_latents, 4), tmp_path, steps=5, batch_size=2, checkpoint_every=3)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000003", "step-0000005"]
    assert result.checkpoint.name == "step-0000005"


def test_lr_lambda_warmup_then_cosine(micro_run):
    tc = micro_run.cfg.train.model_copy(update={"steps": 10, "lr_schedule": LRScheduleConfig(warmup_steps=4)})
    warmup = tc.lr_schedule.warmup_steps
    f = warmup_cosine(warmup, tc.steps, decay_start=warmup)  # the denoiser's
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)
    assert f(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
