"""Evaluation during training: every ``train.eval_every`` steps (and at the end), on the EMA
weights, sample the fixed prompts with a fixed seed (split across ranks), decode, and write a
captioned grid PNG to ``{run}/samples/step-N.png``, to TensorBoard (``{run}/tensorboard``) and a
record with FID/KID/CLIP (where their weights are configured) and the protocol to the metrics log.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from ..config import DiffusionConfig, EvalConfig
from ..diffusion import build_schedule
from ..text.encoder import TextEncoder
from ..utils.images import image_grid
from ..utils.runs import MetricsLog
from .pipeline import Pipeline
from .distributed import generate_across_ranks


def make_periodic_eval(
    run_dir: Path,
    vae: AutoencoderKL,
    text: TextEncoder,
    diffusion_cfg: DiffusionConfig,
    eval_cfg: EvalConfig,
    prompts: list[str],
    latent_shape: list[int],
    accelerator: Accelerator,
    log: MetricsLog,
    metrics_fn: Callable[[torch.Tensor, list[str]], dict] | None = None,
) -> Callable[[int, torch.nn.Module], dict]:
    """A callable ``(step, ema_model) -> record`` for ``train_denoiser(eval_fn=...)``, called on
    every rank: sampling is split across ranks and gathered; the main process writes the grid,
    TensorBoard and the metrics record. ``metrics_fn(images, captions)`` adds FID/KID/CLIP.
    ``eval.guidance_sweep`` (if set) evaluates each guidance scale in turn."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard")) if accelerator.is_main_process else None
    schedule = build_schedule(diffusion_cfg)
    scales = list(eval_cfg.guidance_sweep) or [eval_cfg.guidance_scale]

    def evaluate(step: int, ema_model: torch.nn.Module) -> dict:
        pipe = Pipeline(ema_model.eval(), vae, text, schedule, diffusion_cfg, latent_shape, f"EMA at step {step}")
        records = {}
        for scale in scales:
            t0 = time.time()
            cfg = eval_cfg.model_copy(update={"guidance_scale": scale})
            images, captions = generate_across_ranks(pipe, prompts, cfg, accelerator)
            if accelerator.is_main_process:
                records[scale] = _write(step, scale, len(scales) > 1, images, captions, cfg, time.time() - t0)
        return records

    def _write(step, scale, sweep, images, captions, cfg, seconds) -> dict:
        suffix = f"-cfg{scale:g}" if sweep else ""
        grid = image_grid(images, cfg.samples_per_prompt, captions)
        grid_path = run_dir / "samples" / f"step-{step:07d}{suffix}.png"
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(grid_path)
        writer.add_image(f"samples{suffix}", np.asarray(grid), step, dataformats="HWC")
        writer.flush()
        metrics = metrics_fn(images, captions) if metrics_fn is not None else {}
        record = {
            "stage": "eval",
            "step": step,
            "grid": str(grid_path),
            **metrics,
            "seconds": round(seconds, 2),
            "protocol": {
                "weights": "EMA",
                "sampler": cfg.sampler,
                "steps": cfg.steps,
                "guidance_scale": scale,
                "seed": cfg.seed,
                "prompts": len(prompts),
                "samples_per_prompt": cfg.samples_per_prompt,
                "processes": accelerator.num_processes,
            },
        }
        log.write(**record)
        return record

    return evaluate
