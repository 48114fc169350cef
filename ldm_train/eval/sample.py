"""Text-to-image sampling with a loaded :class:`Pipeline`: prompts -> DDIM latents -> images."""
from __future__ import annotations

import torch

from ..autoencoder.vae import decode_latents
from ..config import EvalConfig
from ..diffusion.sampling import sample_from_config
from .pipeline import Pipeline


@torch.no_grad()
def generate(pipe: Pipeline, prompts: list[str], eval_cfg: EvalConfig, device, batch_size: int = 64, progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """``samples_per_prompt`` images for each prompt, seeded by ``eval_cfg.seed`` so the same call
    gives the same images. Returns (images NCHW in [-1, 1] on the CPU, caption per image)."""
    captions = [p for p in prompts for _ in range(eval_cfg.samples_per_prompt)]
    gen = torch.Generator(device=device).manual_seed(eval_cfg.seed)
    null = pipe.text([""])[0]
    images = []
    for i in range(0, len(captions), batch_size):
        chunk = captions[i : i + batch_size]
        noise = torch.randn((len(chunk), *pipe.latent_shape), generator=gen, device=device)
        z = sample_from_config(
            pipe.unet, noise, pipe.text(chunk), null, pipe.schedule, eval_cfg, pipe.diffusion, gen, progress
        )
        images.append(decode_latents(pipe.vae, z).cpu())
    return torch.cat(images), captions
