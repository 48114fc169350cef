"""Evaluation during training: every ``train.eval_every`` steps (and at the end), on the EMA
weights, sample the fixed prompts with a fixed seed, decode, and write a captioned grid PNG to
``{run}/samples/step-N.png``, to TensorBoard (``{run}/tensorboard``) and a record to the metrics log.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..config import DiffusionConfig, EvalConfig
from ..diffusion import build_schedule
from ..text.encoder import TextEncoder
from ..utils.images import image_grid
from ..utils.runs import MetricsLog
from .pipeline import Pipeline
from .sample import generate


def make_periodic_eval(
    run_dir: Path,
    vae: AutoencoderKL,
    text: TextEncoder,
    diffusion_cfg: DiffusionConfig,
    eval_cfg: EvalConfig,
    prompts: list[str],
    latent_shape: list[int],
    device: torch.device,
    log: MetricsLog,
) -> Callable[[int, torch.nn.Module], dict]:
    """A callable ``(step, ema_model) -> record`` for ``train_denoiser(eval_fn=...)``."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    schedule = build_schedule(diffusion_cfg)

    def evaluate(step: int, ema_model: torch.nn.Module) -> dict:
        t0 = time.time()
        pipe = Pipeline(ema_model.eval(), vae, text, schedule, diffusion_cfg, latent_shape, f"EMA at step {step}")
        images, captions = generate(pipe, prompts, eval_cfg, device)
        grid = image_grid(images, eval_cfg.samples_per_prompt, captions)
        grid_path = run_dir / "samples" / f"step-{step:07d}.png"
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(grid_path)
        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        writer.flush()
        record = {
            "stage": "eval",
            "step": step,
            "grid": str(grid_path),
            "seconds": round(time.time() - t0, 2),
            "protocol": {
                "weights": "EMA",
                "sampler": eval_cfg.sampler,
                "steps": eval_cfg.steps,
                "guidance_scale": eval_cfg.guidance_scale,
                "seed": eval_cfg.seed,
                "prompts": len(prompts),
                "samples_per_prompt": eval_cfg.samples_per_prompt,
            },
        }
        log.write(**record)
        return record

    return evaluate
