"""``export``: a self-contained folder for inference, independent of the training run folder.

Layout (diffusers-style components, every tensor in safetensors, every config in JSON)::

    export/
      model_index.json            which component lives where
      unet/                       EMA weights as a diffusers UNet2DConditionModel folder
                                  (config.json + diffusion_pytorch_model.safetensors)
      vae/                        diffusers AutoencoderKL folder (save_pretrained)
      text_encoder/               open_clip config + weights (see ldm_train.text)
      scheduler/scheduler_config.json   a diffusers DDIMScheduler config

``diffusers.UNet2DConditionModel.from_pretrained(export / "unet")`` and
``AutoencoderKL.from_pretrained(export / "vae")`` load the components directly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler

from ..autoencoder.vae import DTYPES
from ..config import DiffusionConfig, ModelConfig
from ..eval.pipeline import DIFFUSION_FILE, TO_DIFFUSERS_SCHEDULE
from ..model.convert import write_diffusers_unet
from ..text.encoder import TextEncoder, save_text_encoder

def scheduler_for(cfg: DiffusionConfig) -> DDIMScheduler:
    """The diffusers DDIMScheduler equivalent to our schedule and DDIM sampler defaults."""
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=TO_DIFFUSERS_SCHEDULE[cfg.beta_schedule],
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        timestep_spacing="leading",
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
    )


def export_pipeline(
    out_dir: Path,
    model_cfg: ModelConfig,
    ema_weights: dict[str, torch.Tensor],
    latent_shape: list[int],
    vae: AutoencoderKL,
    text: TextEncoder,
    diffusion_cfg: DiffusionConfig,
    dtype: str = "fp32",
) -> Path:
    """Write the export folder (atomically: ``<out>.partial`` renamed when complete)."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weights = {k: v.to(DTYPES[dtype]).contiguous().cpu() for k, v in ema_weights.items()}
    write_diffusers_unet(partial / "unet", model_cfg, weights, sample_size=latent_shape[-1])
    vae.save_pretrained(partial / "vae", safe_serialization=True)
    save_text_encoder(text, partial / "text_encoder", _text_model_cfg(text))
    scheduler_for(diffusion_cfg).save_config(partial / "scheduler")
    # The full diffusion section too (learned variance, weighting...), which diffusers has no key for.
    (partial / "scheduler" / DIFFUSION_FILE).write_text(json.dumps(diffusion_cfg.model_dump(), indent=2))
    index = {
        "_class_name": "ldm_train",
        "unet": "unet",
        "vae": "vae",
        "text_encoder": "text_encoder",
        "scheduler": "scheduler",
        "latent_shape": list(latent_shape),
    }
    (partial / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir


def _text_model_cfg(text: TextEncoder) -> dict | None:
    import open_clip

    return open_clip.get_model_config(text.name)
