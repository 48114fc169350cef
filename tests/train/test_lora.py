"""LoRA on the micro U-Net (train.lora, ldm_train/train/lora.py): the adapter learns while the base
stays bit-identical; only adapter tensors are in the optimizer, the EMA and the checkpoints; resume
is bitwise exact; sampling (periodic eval, run folders) applies the EMA adapter; bad targets,
ranks and files are refused; the sd15-lora preset runs on a tiny SD 1.x pipeline; 2 processes
(DDP, ZeRO-2) resume exactly."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import MICRO, REPO, copy_run
from ldm_train.cli import main
from ldm_train.config import ConfigError, LoraConfig, load_config
from ldm_train.diffusion import build_objective, build_schedule
from ldm_train.eval.pipeline import load_pipeline
from ldm_train.latents.cache import LatentData
from ldm_train.train import checkpoint as ck
from ldm_train.data.shards import DataError
from ldm_train.text import load_text
from ldm_train.train.batches import MemoryBatches, check_text
from ldm_train.train.lora import (LoraError, adapter_state, add_adapter, apply_adapter, base_unet,
                                  check_continued, checkpoint_adapter, rank_alpha, read_adapter_file,
                                  text_base)
from ldm_train.train.loop import make_accelerator, train_denoiser
from ldm_train.train.resume import ResumeError
from ldm_train.utils.runs import MetricsLog

LORA = ["train.lora.enabled=true", "train.lora.rank=4", "train.lora.alpha=8"]
CPU = torch.device("cpu")


def lora_cfg(micro_run, **lora):
    return micro_run.cfg.train.lora.model_copy(update={"enabled": True, "rank": 4, "alpha": 8.0, **lora})


def fixed(data: LatentData, n: int) -> LatentData:
    return LatentData(data.mean[:n], data.std[:n], data.context[:n], data.captions[:n], data.keys[:n],
                      data.null_context, data.manifest)


def loop(micro_run, latents, run, lora=None, resume_from=None, eval_fn=None, **train):
    cfg = micro_run.cfg
    update = {"log_every": 1, "lora": lora or lora_cfg(micro_run), **train}
    tc = cfg.train.model_copy(update=update)
    return train_denoiser(
        model=cfg.model, diffusion=cfg.diffusion, train=tc, distributed=cfg.distributed,
        accelerator=make_accelerator(cfg.distributed), batches=MemoryBatches(latents, tc.batch_size, 0, 0),
        run_dir=run, seed=0, log=MetricsLog(run / "metrics.jsonl"), resume_from=resume_from, eval_fn=eval_fn,
    )


def fixed_loss(micro_run, model, latents) -> float:
    """The objective on one fixed batch, noise and timesteps (same generator state every call)."""
    cfg = micro_run.cfg
    objective, schedule = build_objective(cfg.diffusion.model_copy(update={"cond_drop_prob": 0.0})), build_schedule(cfg.diffusion)
    z, context = MemoryBatches(latents, 8, 123, 0).next(CPU)
    with torch.no_grad():
        loss, _ = objective(model.eval(), z, context, latents.null_context.float(), schedule, torch.Generator().manual_seed(7))
    return float(loss)


def base_of(model) -> dict[str, torch.Tensor]:
    """The base weights of an adapted U-Net under their plain names."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def test_the_adapter_learns_and_only_it_is_trained_saved_and_averaged(micro_run, micro_latents, tmp_path):
    batch = fixed(micro_latents, 8)  # one batch, drawn again and again: the loss must go down
    before_model = add_adapter(base_unet(micro_run.cfg.model, 0), lora_cfg(micro_run))
    before = fixed_loss(micro_run, before_model, batch)
    model, ema, result = loop(micro_run, batch, tmp_path / "run", steps=20, checkpoint_every=20, lr=3e-2,
                              ema_decays=[0.9], lr_schedule=micro_run.cfg.train.lr_schedule.model_copy(update={"warmup_steps": 0}))
    after = fixed_loss(micro_run, model, batch)
    assert after < 0.85 * before, (before, after)
    plain = base_unet(micro_run.cfg.model, 0)  # the base bit for bit as built (seed 0), untouched by training
    assert base_of(model).keys() == plain.state_dict().keys()
    assert all(torch.equal(base_of(model)[k], v) for k, v in plain.state_dict().items())
    adapter = adapter_state(model)
    n_adapter = sum(v.numel() for v in adapter.values())
    # micro U-Net: 4 transformer blocks x 2 attentions x 4 projections, rank 4: A (4 x in) + B (out x 4)
    assert len(adapter) == 64 and n_adapter == 8192 and rank_alpha(model) == (4, 8.0)
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000020"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert weights.keys() == adapter.keys() and all(torch.equal(weights[k], adapter[k]) for k in adapter)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    shapes = sorted(tuple(s["exp_avg"].shape) for s in optimizer["state"].values())
    assert shapes == sorted(tuple(v.shape) for v in adapter.values())  # AdamW state for the adapter only
    assert checkpoint_adapter(ckpt, "ema").keys() == adapter.keys()
    assert ema.nbytes() == 4 * n_adapter
    full = sum(p.numel() for p in plain.parameters())
    size = (ckpt / "model.safetensors").stat().st_size
    assert size < 4 * n_adapter + 10_000 and full > 30 * n_adapter  # vs 1 MB of full fp32 weights here


def same_files(a, b):
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_resume_is_bitwise_exact_with_dropout_and_evaluations(micro_run, micro_latents, tmp_path):
    """8 steps == 4 + resume + 4 (adapter, both EMAs, AdamW state); the interrupted run also builds
    its EMA-adapter model for evaluation (which draws init values) without changing anything."""
    lora = lora_cfg(micro_run, dropout=0.1, target_modules=["to_q", "to_v", "proj_in", "conv1"])
    common = dict(steps=8, checkpoint_every=4, ema_decays=[0.9, 0.99], lora=lora)
    loop(micro_run, micro_latents, tmp_path / "whole", **common)
    seen = []
    evals = lambda step, model, writers: seen.append((step, sorted(adapter_state(model))[:1]))  # noqa: E731
    loop(micro_run, micro_latents, tmp_path / "cut", eval_fn=evals, eval_every=2, **common)
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000008")
    _, _, result = loop(micro_run, micro_latents, tmp_path / "cut", eval_fn=evals, eval_every=2,
                        resume_from=tmp_path / "cut" / "checkpoints" / "step-0000004", **common)
    assert result.resumed_from.name == "step-0000004" and [s for s, _ in seen] == [2, 4, 6, 8, 6, 8]
    whole, cut = (tmp_path / r / "checkpoints" / "step-0000008" for r in ("whole", "cut"))
    for name in ("model.safetensors", "ema-00000-of-00001.safetensors"):
        same_files(load_file(str(whole / name)), load_file(str(cut / name)))
    opt_a, opt_b = (torch.load(c / "optimizer.pt", weights_only=True)["state"] for c in (whole, cut))
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    assert ck.read_state(whole)["lora"] is True


def test_a_full_checkpoint_does_not_resume_a_lora_run(micro_run, micro_latents, tmp_path):
    cfg = micro_run.cfg
    loop(micro_run, micro_latents, tmp_path / "run", steps=2, checkpoint_every=2,
         lora=cfg.train.lora)  # lora disabled: full weights
    with pytest.raises(ResumeError, match="without train.lora"):
        loop(micro_run, micro_latents, tmp_path / "run", steps=4, resume_from=tmp_path / "run" / "checkpoints" / "step-0000002")


def test_apply_adapter_equals_the_merged_weights(micro_run, micro_latents, tmp_path):
    """An adapter applied from its tensors alone (a LoRA file: ranks from the shapes, alpha given)
    computes W + alpha/r B A for each module, as the trained model does."""
    model, _, _ = loop(micro_run, micro_latents, tmp_path / "run", steps=3, lr=1e-2)
    state = adapter_state(model)
    from_file = apply_adapter(base_unet(micro_run.cfg.model, 0), state, alphas=8.0)
    merged = base_unet(micro_run.cfg.model, 0)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for key in [k for k in state if ".lora_A." in k]:
            module = key.rsplit(".lora_A.", 1)[0]
            params[f"{module}.weight"] += 8.0 / 4 * state[f"{module}.lora_B.weight"] @ state[key]
    z, context = MemoryBatches(micro_latents, 4, 1, 0).next(CPU)
    t = torch.tensor([10, 200, 500, 900])
    outs = [m.eval()(z, t, context) for m in (model, from_file, merged)]
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=1e-5)
    path = tmp_path / "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights naming
    from safetensors.torch import save_file

    save_file({f"unet.{k}": v for k, v in state.items()}, str(path))
    assert read_adapter_file(tmp_path).keys() == state.keys()


def test_refusals(micro_run, micro_latents, tmp_path, capsys):
    unet = base_unet(micro_run.cfg.model, 0)
    with pytest.raises(LoraError, match=r"'to_qq' matches no U-Net module; closest names: to_q") as err:
        add_adapter(unet, LoraConfig(enabled=True, target_modules=["to_k", "to_qq"]))
    assert "\n" not in str(err.value)
    with pytest.raises(LoraError, match=r"'norm1' names GroupNorm layers \(e\.g\. down_blocks\.0\.resnets\.0\.norm1\)"):
        add_adapter(base_unet(micro_run.cfg.model, 0), LoraConfig(enabled=True, target_modules=["norm1"]))
    for override, needle in (("train.lora.rank=0", "train.lora.rank: Input should be greater than 0"),
                             ("train.lora.text_encoder=true", "set latents.text: tokens")):
        with pytest.raises(ConfigError, match=needle):
            load_config(MICRO, [override])
    state = adapter_state(add_adapter(base_unet(micro_run.cfg.model, 0), lora_cfg(micro_run)))
    other = {k.replace("down_blocks.1", "down_blocks.7"): v for k, v in state.items()}
    with pytest.raises(LoraError, match=r"'down_blocks\.7\..*' is not an adapter of this U-Net"):
        apply_adapter(base_unet(micro_run.cfg.model, 0), other, lora_cfg(micro_run))
    wide = {k: torch.cat([v, v]) if ".lora_A." in k else v for k, v in state.items()}
    with pytest.raises(LoraError, match="has shape"):
        apply_adapter(base_unet(micro_run.cfg.model, 0), wide, lora_cfg(micro_run))
    with pytest.raises(LoraError, match="has rank 4, alpha 4; this run has train.lora.rank=4, train.lora.alpha=8"):
        check_continued(lora_cfg(micro_run), 4, 4.0, "x.safetensors")
    with pytest.raises(LoraError, match="needs text.encoder: transformers"):  # open_clip: one fused attention
        text_base(load_text(micro_run.cfg.text, micro_run.cfg.path(micro_run.cfg.text.dir)))
    with pytest.raises(DataError, match="holds text embeddings; train.lora.text_encoder"):
        check_text(micro_latents.manifest, True, "cache")
    run = copy_run(micro_run, tmp_path / "run")  # through the CLI: one line, exit 2
    assert main(["train", "--config", str(MICRO), f"run.dir={run}", "distributed.cpu=true", *LORA,
                 "train.lora.target_modules=[to_q,attn_1]"]) == 2
    err = capsys.readouterr().err
    assert "'attn_1' matches no U-Net module; closest names: attn1, attn2" in err and "Traceback" not in err


def test_run_folder_samples_with_the_ema_adapter_and_eval_says_so(micro_run, tmp_path):
    run = copy_run(micro_run, tmp_path / "run", ("latents", "vae", "text", "data"))
    assert main(["train", "--config", str(MICRO), f"run.dir={run}", "distributed.cpu=true", *LORA,
                 "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"]) == 0
    evals = [r for r in MetricsLog(run / "metrics.jsonl").read() if r.get("stage") == "eval"]
    assert evals[0]["protocol"]["adapter"] == "rank 4, alpha 8" and (run / "samples" / "step-0000002.png").is_file()
    pipe = load_pipeline(run, CPU)
    assert "LoRA adapter" in pipe.source
    ema = checkpoint_adapter(run / "checkpoints" / "step-0000002", "ema")
    assert adapter_state(pipe.unet).keys() == ema.keys()
    assert all(torch.equal(adapter_state(pipe.unet)[k], ema[k]) for k in ema)
    assert json.loads((run / "checkpoints" / "step-0000002" / "state.json").read_text())["lora"] is True
    assert load_config(run / "config.yaml").train.lora.rank == 4  # the run config records the section


def test_sd15_lora_preset_on_a_tiny_sd1_pipeline(tmp_path):
    from pretrained.test_sd_finetune import finetune
    from pretrained.tiny_sd import make_tiny_sd

    sd1 = make_tiny_sd(tmp_path / "sd1", "sd1")
    run = tmp_path / "run"
    finetune("sd15-lora", sd1, run)
    cfg = load_config(run / "config.yaml")
    assert cfg.train.lora.enabled and cfg.train.lora.rank == 16 and cfg.model.init_from == str(sd1 / "unet")
    ckpt = run / "checkpoints" / "step-0000002"
    adapter = load_file(str(ckpt / "model.safetensors"))
    assert all(".lora_" in k for k in adapter) and not any(".base_layer." in k for k in adapter)
    full = (sd1 / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    print(f"tiny sd1: adapter checkpoint {(ckpt / 'model.safetensors').stat().st_size} B, full U-Net {full} B")
    pipe = load_pipeline(run, CPU)
    assert rank_alpha(pipe.unet) == (16, 16.0)


# ---- two processes -------------------------------------------------------------------------------

def torchrun_train(run, *overrides) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "ldm_train.cli", "train", "--config", str(MICRO), f"run.dir={run}", "distributed.cpu=true",
            *LORA, *overrides]


def run_ok(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def ckpt_tensors(ckpt) -> dict[str, torch.Tensor]:
    out = {f"{f.name}/{k}": v for f in sorted(ckpt.glob("*.safetensors")) if not f.name.startswith("rank-")
           for k, v in load_file(str(f)).items()}
    for f in sorted(ckpt.rglob("*.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        out.update({f"{f.relative_to(ckpt)}/{k}": v for k, v in _flat(state)})
    return out


def _flat(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}.{i}")


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_two_processes_train_the_adapter_and_resume_exactly(micro_run, tmp_path, strategy):
    """2 ranks (gloo): 4 steps, then the last checkpoint removed and the same command resumes from step
    2: step 4 again bit for bit (adapter, EMA, optimizer state); no base weights anywhere in it."""
    run = copy_run(micro_run, tmp_path / "run")
    common = ["train.steps=4", "train.checkpoint_every=2", "train.log_every=1", "train.lora.dropout=0.1",
              f"distributed.strategy={strategy}"]
    where = run_ok([sys.executable, "-c", "import ldm_train; print(ldm_train.__file__)"], tmp_path)
    assert where.stdout.strip() == str(REPO / "ldm_train" / "__init__.py")  # the ranks run this checkout's code
    run_ok(torchrun_train(run, *common), tmp_path)
    ckpt = run / "checkpoints" / "step-0000004"
    first = ckpt_tensors(ckpt)
    shutil.move(ckpt, tmp_path / "first")
    out = run_ok(torchrun_train(run, *common), tmp_path)
    assert '"resumed_from": "' + str(run / "checkpoints" / "step-0000002") in out.stdout
    again = ckpt_tensors(ckpt)
    same_files(first, again)
    n_adapter = sum(v.numel() for k, v in again.items() if k.startswith("model.safetensors/"))
    assert n_adapter == 8192
    base = sum(p.numel() for p in base_unet(micro_run.cfg.model, 0).parameters())
    saved = sum(v.numel() for k, v in again.items() if "model_states" in k or k.startswith("model.safetensors/"))
    assert saved <= 2 * n_adapter < base  # DeepSpeed's module file too holds the adapter only
