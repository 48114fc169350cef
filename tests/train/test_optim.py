"""train.optimizer and train.lr_schedule: the choices, their keys, the refusals (naming the key),
and for every optimizer N steps == N/2 + save + resume N/2 bit for bit (one process)."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
import yaml

from ldm_train.config import ConfigError, DistributedConfig, LRScheduleConfig, OptimizerConfig, TrainConfig, load_config
from ldm_train.train import checkpoint as ck
from ldm_train.train import optim
from ldm_train.train.batches import MemoryBatches
from ldm_train.train.loop import make_accelerator, train_denoiser
from ldm_train.utils.lr import schedule_lambda, warmup_cosine
from ldm_train.utils.runs import MetricsLog

from conftest import MICRO

OPTIMIZERS = ["adamw", "adamw8bit", "adafactor", "prodigy", "lion"]


def cfg_with(opt: str, sched: str = "cosine", **opt_keys) -> TrainConfig:
    return TrainConfig(optimizer=OptimizerConfig(name=opt, **opt_keys), lr_schedule=LRScheduleConfig(name=sched))


def test_old_flat_keys_are_refused_with_their_new_place(tmp_path):
    for old, new in [("train.betas=[0.9,0.99]", "train.optimizer.betas"), ("train.weight_decay=0.1", "train.optimizer.weight_decay"),
                     ("train.fused_optimizer=false", "train.optimizer.fused"), ("train.warmup_steps=5", "train.lr_schedule.warmup_steps")]:
        with pytest.raises(ConfigError, match=f"moved to {new}"):
            load_config(None, [old])


def test_an_old_run_folder_config_migrates_to_the_nested_sections(tmp_path):
    tree = load_config(None).model_dump()
    train = tree["train"]
    del train["optimizer"], train["lr_schedule"]
    train.update(betas=[0.8, 0.9], weight_decay=0.01, fused_optimizer=False, warmup_steps=7)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)  # a resolved config: read with the moved keys in their new places
    assert cfg.train.optimizer == OptimizerConfig(betas=[0.8, 0.9], weight_decay=0.01, fused=False)
    assert cfg.train.lr_schedule == LRScheduleConfig(warmup_steps=7)


def test_unknown_names_and_keys_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.optimizer.name"):
        load_config(None, ["train.optimizer.name=sgd"])
    with pytest.raises(ConfigError, match="train.lr_schedule.name"):
        load_config(None, ["train.lr_schedule.name=step"])
    with pytest.raises(ConfigError, match=r"train\.optimizer\.eps: not read by train\.optimizer\.name=lion"):
        optim.check_optimizer(cfg_with("lion", eps=1e-6), DistributedConfig())
    with pytest.raises(ConfigError, match=r"train\.optimizer\.fused: not read by .*=prodigy"):
        optim.check_optimizer(cfg_with("prodigy", fused=False), DistributedConfig())
    bad = TrainConfig(lr_schedule=LRScheduleConfig(name="cosine", num_cycles=3))
    with pytest.raises(ConfigError, match=r"train\.lr_schedule\.num_cycles: not read by .*=cosine"):
        optim.check_optimizer(bad, DistributedConfig())


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_adafactor_is_refused_under_zero_naming_the_strategy(strategy):
    with pytest.raises(ConfigError, match=f"train.optimizer.name=adafactor .*distributed.strategy={strategy}.*2-D shape"):
        optim.check_optimizer(cfg_with("adafactor"), DistributedConfig(strategy=strategy))
    for name in ("adamw", "adamw8bit", "prodigy", "lion"):
        optim.check_optimizer(cfg_with(name), DistributedConfig(strategy=strategy))


def test_prodigy_under_zero_on_several_cpu_processes_is_refused():
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="train.optimizer.name=prodigy .*distributed.strategy=zero2 on cpu with 2 processes"):
        optim.check_optimizer(cfg_with("prodigy"), DistributedConfig(strategy="zero2"), cpu, world=2)
    optim.check_optimizer(cfg_with("prodigy"), DistributedConfig(strategy="zero2"), cpu, world=1)
    optim.check_optimizer(cfg_with("prodigy"), DistributedConfig(strategy="ddp"), cpu, world=2)


def test_only_adamw_with_optimizer_offload():
    dist = DistributedConfig(strategy="zero2", offload_optimizer=True)
    optim.check_optimizer(cfg_with("adamw"), dist)
    with pytest.raises(ConfigError, match="train.optimizer.name=lion cannot run with distributed.offload_optimizer"):
        optim.check_optimizer(cfg_with("lion"), dist)


def test_an_unavailable_package_is_refused_by_name_with_the_reason(monkeypatch):
    monkeypatch.setattr(optim, "bnb_unavailable", lambda device: "bitsandbytes does not import (no CUDA build)")
    with pytest.raises(ConfigError, match=r"train.optimizer.name=adamw8bit is unavailable: bitsandbytes does not import \(no CUDA"):
        optim.check_optimizer(cfg_with("adamw8bit"), DistributedConfig())
    monkeypatch.setitem(__import__("sys").modules, "prodigyopt", None)  # import fails
    with pytest.raises(ConfigError, match="train.optimizer.name=prodigy is unavailable: package prodigyopt"):
        optim.check_optimizer(cfg_with("prodigy"), DistributedConfig())


def test_the_default_is_the_fused_adamw_and_warmup_cosine_it_always_was():
    tc = TrainConfig(steps=50)
    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = optim.build_optimizer(p, tc, deepspeed=False, world=1)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True and opt.defaults["betas"] == (0.9, 0.999)
    assert opt.defaults["eps"] == 1e-8 and opt.defaults["weight_decay"] == 0.0
    assert optim.build_optimizer(p, tc, deepspeed=True, world=2).defaults["fused"] is None
    sched = optim.build_lr_scheduler(opt, tc)
    f = warmup_cosine(100, 50, decay_start=100)
    assert [sched.lr_lambdas[0](s) for s in range(60)] == [f(s) for s in range(60)]


def test_the_schedules():
    w, total = 4, 24
    const = schedule_lambda("constant", w, total, decay_start=w)
    lin = schedule_lambda("linear", w, total, decay_start=w, min_lr_ratio=0.0)
    cos = schedule_lambda("cosine", w, total, decay_start=w, min_lr_ratio=0.2)
    rst = schedule_lambda("cosine_restarts", w, total, decay_start=w, min_lr_ratio=0.0, num_cycles=2)
    for f in (const, lin, cos, rst):
        assert [f(s) for s in range(w)] == [0.25, 0.5, 0.75, 1.0]
    assert [const(s) for s in range(w, 40)] == [1.0] * (40 - w)
    assert lin(14) == pytest.approx(0.5) and lin(24) == 0.0 and lin(30) == 0.0
    assert cos(14) == pytest.approx(0.6) and cos(24) == pytest.approx(0.2)
    assert rst(9) == pytest.approx(0.5) and rst(14) == pytest.approx(1.0) and rst(19) == pytest.approx(0.5)
    assert rst(23) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9))) and rst(24) == 0.0


def _loop(micro_run, micro_latents, run, train_cfg, resume_from=None):
    cfg = micro_run.cfg
    return train_denoiser(
        model=cfg.model, diffusion=cfg.diffusion, train=train_cfg, distributed=cfg.distributed,
        accelerator=make_accelerator(cfg.distributed), batches=MemoryBatches(micro_latents, train_cfg.batch_size, 0, 0),
        run_dir=run, seed=0, log=MetricsLog(run / "metrics.jsonl"), resume_from=resume_from,
    )


def _tensors(obj, prefix):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")


def _state(run, step):
    from safetensors.torch import load_file

    folder = run / "checkpoints" / f"step-{step:07d}"
    out = {f"model/{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    opt = ck.load_optimizer_state(folder)
    out.update(_tensors(opt["state"], "opt"))  # bitsandbytes nests its quantised state one level deeper
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]  # Prodigy's d lives here
    return out, groups, ck.read_state(folder)["lr_scheduler"]


# each optimizer with a schedule, so that every optimizer and every schedule resumes exactly
PAIRS = [("adamw", "cosine"), ("adamw8bit", "linear"), ("adafactor", "constant"), ("prodigy", "cosine_restarts"),
         ("lion", "cosine_restarts")]


@pytest.mark.parametrize("name, schedule", PAIRS)
def test_n_steps_equal_half_plus_resume_plus_half_bitwise(micro_run, micro_latents, tmp_path, name, schedule):
    if name == "adamw8bit" and (reason := optim.bnb_unavailable(str(make_accelerator(micro_run.cfg.distributed).device))):
        pytest.skip(f"adamw8bit cannot run on this device: {reason}")
    n = 6
    tc = micro_run.cfg.train.model_copy(update={
        "steps": n, "checkpoint_every": n // 2, "log_every": 1, "lr": 1.0 if name == "prodigy" else 1e-3,
        "optimizer": OptimizerConfig(name=name),
        "lr_schedule": LRScheduleConfig(name=schedule, warmup_steps=2, num_cycles=2 if schedule == "cosine_restarts" else 1)})
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _loop(micro_run, micro_latents, whole, tc)
    _loop(micro_run, micro_latents, cut, tc)
    shutil.rmtree(cut / "checkpoints" / f"step-{n:07d}")
    _, _, result = _loop(micro_run, micro_latents, cut, tc, resume_from=cut / "checkpoints" / f"step-{n // 2:07d}")
    assert result.resumed_from.name == f"step-{n // 2:07d}"
    (wa, ga, sa), (wb, gb, sb) = _state(whole, n), _state(cut, n)
    assert wa.keys() == wb.keys() and any(k.startswith("opt/") for k in wa)
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []  # weights and optimizer state
    assert ga == gb and sa == sb  # param groups (LR, Prodigy's d, ...) and the LR scheduler
    first = _state(whole, n // 2)[0]
    assert any(not torch.equal(first[k], wa[k]) for k in wa if k.startswith("model/"))  # it did train


def test_micro_preset_still_loads():
    assert load_config(MICRO).train.lr_schedule.warmup_steps == 2
