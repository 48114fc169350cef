"""Evaluation during training: every ``train.eval_every`` steps (and at the end), on the EMA
weights (with ``train.lora``: the frozen base with the EMA of the adapter applied), sample the fixed
prompts with a fixed seed (split across ranks), decode, and write a captioned grid PNG to ``{run}/samples/step-N.png``, to TensorBoard through the training's writers
and a record with FID/KID/CLIP (where their weights are configured) and the protocol to the
metrics log.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator

from ..autoencoder.vae import load_vae
from ..config import Config, EvalConfig
from ..diffusion import build_schedule
from ..latents.cache import load_latent_buckets, read_manifest
from ..text import load_text
from ..text.hf import HFTextEncoder
from ..train.lora import TextConditioned, has_adapter, rank_alpha
from ..train.telemetry import Writers
from ..utils.images import image_grid
from ..utils.runs import MetricsLog
from .distributed import generate_across_ranks
from .pipeline import Pipeline
from .report import ImageMetrics


def periodic_eval(cfg: Config, accelerator: Accelerator, log: MetricsLog) -> Callable[[int, torch.nn.Module, Writers], dict]:
    """The in-training evaluation of a run, built once before training: configured prompts, or
    the first validation captions; the frozen VAE and text tower; and, on the main process (the
    only one that scores), the FID/KID reference, so that no evaluation re-reads the images."""
    latents = cfg.path(cfg.latents.dir)
    prompts = list(cfg.eval.prompts) or sorted({c for part in load_latent_buckets(latents / "val") for c in part.captions})[:8]
    device = accelerator.device
    frozen = Pipeline(
        None, load_vae(cfg.path(cfg.autoencoder.path), cfg.autoencoder.dtype).to(device),
        load_text(cfg.text, cfg.path(cfg.text.dir)).to(device), build_schedule(cfg.diffusion), cfg.diffusion,
        read_manifest(latents / "train")["latent_shape"], "",
    )
    metrics = ImageMetrics.from_config(cfg) if accelerator.is_main_process else None
    return make_periodic_eval(cfg.path("{run}"), frozen, cfg.eval, prompts, accelerator, log, metrics)


def make_periodic_eval(
    run_dir: Path,
    frozen: Pipeline,
    eval_cfg: EvalConfig,
    prompts: list[str],
    accelerator: Accelerator,
    log: MetricsLog,
    metrics: Callable[[torch.Tensor, list[str]], dict] | None = None,
) -> Callable[[int, torch.nn.Module, Writers], dict]:
    """A callable ``(step, ema_model, writers) -> records`` for ``train_denoiser(eval_fn=...)``,
    called on every rank: sampling is split across ranks and gathered; the main process writes
    the grid, the TensorBoard image (through the loop's ``writers``) and the metrics record.
    ``frozen``: the pipeline without its U-Net, which each call fills in with the EMA weights.
    ``metrics(images, captions)`` adds FID/KID/CLIP (main process only). ``eval.guidance_sweep``
    (if set) evaluates each guidance scale in turn."""
    scales = list(eval_cfg.guidance_sweep) or [eval_cfg.guidance_scale]

    def evaluate(step: int, ema_model: torch.nn.Module, writers: Writers) -> dict:
        adapter = "rank {}, alpha {:g}".format(*rank_alpha(ema_model)) if has_adapter(ema_model) else None
        pipe = dataclasses.replace(frozen, unet=ema_model.eval(), source=f"EMA at step {step}")
        if isinstance(ema_model, TextConditioned):  # train.lora.text_encoder: the tower with its EMA adapter
            text = HFTextEncoder(ema_model.text, frozen.text.tokenizer, frozen.text.layer, frozen.text.source_layers)
            pipe = dataclasses.replace(pipe, unet=ema_model.unet, text=text)
        records = {}
        for scale in scales:
            t0 = time.time()
            cfg = eval_cfg.model_copy(update={"guidance_scale": scale})
            images, captions = generate_across_ranks(pipe, prompts, cfg, accelerator)
            seconds = time.time() - t0  # sampling only
            if accelerator.is_main_process:
                suffix = f"-cfg{scale:g}" if len(scales) > 1 else ""
                grid = _write_grid(run_dir, step, suffix, images, captions, cfg, writers)
                records[scale] = _record(step, grid, images, captions, cfg, seconds, adapter)
                log.write(**records[scale])
        return records

    def _record(step, grid, images, captions, cfg, seconds, adapter) -> dict:
        return {
            "stage": "eval",
            "step": step,
            "grid": str(grid),
            **(metrics(images, captions) if metrics is not None else {}),
            "seconds": round(seconds, 2),
            "protocol": {
                "weights": "EMA",
                "adapter": adapter,  # LoRA: "rank R, alpha A" (the EMA is the adapter's), else None
                "sampler": cfg.sampler,
                "sampler_settings": cfg.sampler_settings(),  # beyond the sampler's defaults
                "steps": cfg.steps,
                "guidance_scale": cfg.guidance_scale,
                "seed": cfg.seed,
                "prompts": len(prompts),
                "samples_per_prompt": cfg.samples_per_prompt,
                "processes": accelerator.num_processes,
            },
        }

    return evaluate


def _write_grid(run_dir: Path, step: int, suffix: str, images, captions, cfg: EvalConfig, writers: Writers) -> Path:
    """``{run}/samples/step-N{suffix}.png`` and the same grid as the TensorBoard image ``samples{suffix}``."""
    grid = image_grid(images, cfg.samples_per_prompt, captions)
    path = run_dir / "samples" / f"step-{step:07d}{suffix}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    writers.image(f"samples{suffix}", np.asarray(grid), step)
    return path
