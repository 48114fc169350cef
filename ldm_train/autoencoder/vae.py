"""Stage 1: a KL-regularised autoencoder in the diffusers ``AutoencoderKL`` format.

A pretrained VAE folder (e.g. Stable Diffusion's ``vae/``) and one trained by ``train-vae`` are
loaded by the same :func:`load_vae`, so every later stage is agnostic of where it came from.
Latents fed to the diffusion model are ``z = scaling_factor * (posterior_sample - shift_factor)``
(LDM sec. 4.3.2: rescale so the latents have roughly unit variance).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ..errors import UserError
from ..config import AutoencoderConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class AutoencoderError(UserError):
    """A VAE folder that cannot be used; the message names the path and what to provide."""


def build_vae(cfg: AutoencoderConfig) -> AutoencoderKL:
    """A fresh, randomly initialised AutoencoderKL; downsampling factor 2**(levels-1)."""
    levels = len(cfg.block_out_channels)
    for ch in cfg.block_out_channels:
        if ch % cfg.norm_num_groups:
            raise AutoencoderError(
                f"autoencoder.block_out_channels: {ch} is not divisible by autoencoder.norm_num_groups={cfg.norm_num_groups}"
            )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=1.0,
    )


def load_vae(path: str | Path, dtype: str = "fp32") -> AutoencoderKL:
    """Load a diffusers AutoencoderKL folder from local disk (never from a hub)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise AutoencoderError(
            f"no autoencoder at {folder}: expected a diffusers AutoencoderKL folder with config.json and "
            "diffusion_pytorch_model.safetensors. Train one with `ldm-train train-vae`, or copy a "
            "pretrained VAE folder (e.g. a Stable Diffusion checkpoint's vae/) there and set autoencoder.path"
        )
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=DTYPES[dtype], local_files_only=True)
    return vae.eval().requires_grad_(False)


def latent_scale(vae: AutoencoderKL) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from the VAE's config; shift is 0 for SD 1/2 VAEs."""
    shift = getattr(vae.config, "shift_factor", None)
    return float(vae.config.scaling_factor), float(shift or 0.0)


@torch.no_grad()
def encode_posterior(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1,1] -> posterior (mean, std), unscaled, in the VAE's dtype."""
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    return dist.mean, dist.std


def to_latent(mean: torch.Tensor, std: torch.Tensor, scale: float, shift: float, generator=None) -> torch.Tensor:
    """Draw z ~ N(mean, std^2) from a cached posterior and rescale to the diffusion latent space."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return (mean.float() + std.float() * eps - shift) * scale


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (float32)."""
    scale, shift = latent_scale(vae)
    x = vae.decode((z / scale + shift).to(vae.dtype)).sample
    return x.float().clamp(-1, 1)
