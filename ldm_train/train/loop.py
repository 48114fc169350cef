"""The denoiser training loop: one plain function, with logging, checkpointing and evaluation as
separate calls on intervals (the nanoGPT / DiT ``train.py`` shape).

Distribution enters only here, through HF Accelerate: ``accelerator.prepare`` wraps the model from
outside, so ``model/`` and ``diffusion/`` stay free of accelerate and torch.distributed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm import tqdm

from ..autoencoder.vae import to_latent
from ..config import DiffusionConfig, DistributedConfig, ModelConfig, TrainConfig
from ..diffusion import build_schedule
from ..diffusion.objective import build_objective
from ..latents.cache import LatentData
from ..model import build_unet, load_unet_weights
from ..utils.runs import MetricsLog
from .checkpoint import save_checkpoint
from .ema import EMA


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    checkpoint: Path | None
    losses: list[tuple[int, float]] = field(default_factory=list)


def lr_lambda(train_cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10% of the peak by the last step."""
    warmup, total = train_cfg.warmup_steps, max(1, train_cfg.steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_accelerator(dist: DistributedConfig) -> Accelerator:
    return Accelerator(
        mixed_precision=dist.mixed_precision,
        cpu=dist.cpu,
        gradient_accumulation_steps=dist.gradient_accumulation_steps,
    )


def sample_batch(data: LatentData, batch_size: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of fresh latents z ~ N(mean, std^2) (scaled) and their text contexts."""
    idx = torch.randint(0, len(data), (batch_size,), generator=gen)
    scale, shift = data.manifest["scaling_factor"], data.manifest["shift_factor"]
    z = to_latent(data.mean[idx], data.std[idx], scale, shift, generator=gen)
    return z.to(device), data.context[idx].to(device, torch.float32)


def train_denoiser(
    model_cfg: ModelConfig,
    diffusion_cfg: DiffusionConfig,
    train_cfg: TrainConfig,
    accelerator: Accelerator,
    data: LatentData,
    run_dir: Path,
    seed: int,
    log: MetricsLog,
    eval_fn: Callable[[int, torch.nn.Module], object] | None = None,
) -> tuple[torch.nn.Module, EMA, TrainResult]:
    """Train a U-Net on the latent cache; returns (model, EMA, summary). Checkpoints go to
    ``run_dir/checkpoints``; ``eval_fn(step, ema_model)`` runs every ``train.eval_every`` steps
    and at the end, on every rank."""
    torch.manual_seed(seed)
    model = build_unet(model_cfg)
    if model_cfg.init_from is not None:
        load_unet_weights(model, model_cfg.init_from)  # e.g. a pretrained SD U-Net folder
    ema = EMA(model, train_cfg.ema_decay)
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=train_cfg.lr,
        betas=tuple(train_cfg.betas),
        weight_decay=train_cfg.weight_decay,
        fused=train_cfg.fused_optimizer or None,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train_cfg))
    model, opt, sched = accelerator.prepare(model, opt, sched)
    step_model = torch.compile(model) if train_cfg.compile else model
    device = accelerator.device
    schedule = build_schedule(diffusion_cfg)
    objective = build_objective(diffusion_cfg)
    data_gen = torch.Generator().manual_seed(seed + accelerator.process_index)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1_000_003 + accelerator.process_index)
    null = data.null_context.to(device, torch.float32)
    t0, losses, window, ckpt = time.time(), [], [], None
    bar = tqdm(range(train_cfg.steps), desc="train", unit="step", dynamic_ncols=True, disable=not accelerator.is_main_process)
    for step in bar:
        z, context = sample_batch(data, train_cfg.batch_size, data_gen, device)
        with accelerator.accumulate(model), accelerator.autocast():
            loss, stats = objective(step_model, z, context, null, schedule, noise_gen)
            accelerator.backward(loss)
            if accelerator.sync_gradients and train_cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            ema.update(accelerator.unwrap_model(model))
        window.append(stats["loss"])  # a tensor: no host sync until the log step
        done = step + 1
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            value = torch.stack(window).mean().item()  # mean over the interval, not one noisy batch
            window.clear()
            losses.append((step, value))
            log.write(stage="train", step=step, loss=value, lr=sched.get_last_lr()[0])
            bar.set_postfix(loss=f"{value:.4f}")
        if done % train_cfg.checkpoint_every == 0 or done == train_cfg.steps:
            ckpt = _checkpoint(accelerator, run_dir, done, model, ema, opt, sched)
        every = train_cfg.eval_every
        if eval_fn is not None and every > 0 and (done % every == 0 or done == train_cfg.steps):
            eval_fn(done, _ema_model(model_cfg, ema, device))  # every rank: sampling is split
    tail = [v for _, v in losses[-5:]] or [float("nan")]
    result = TrainResult(train_cfg.steps, sum(tail) / len(tail), time.time() - t0, ckpt, losses)
    return accelerator.unwrap_model(model), ema, result


def _ema_model(model_cfg: ModelConfig, ema: EMA, device) -> torch.nn.Module:
    model = build_unet(model_cfg).to(device)
    ema.copy_to(model)
    return model.eval()


def _checkpoint(accelerator: Accelerator, run_dir: Path, step: int, model, ema: EMA, opt, sched) -> Path | None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    state = {"ema_updates": ema.num_updates, "lr_scheduler": sched.state_dict()}
    return save_checkpoint(
        run_dir / "checkpoints", step, accelerator.unwrap_model(model), ema.state_dict(), opt, state, keep_last=3
    )
