"""Text-to-image sampling with a loaded :class:`Pipeline`: prompts -> latents -> images, on one
process or split across the ranks of a launcher (each rank its share, gathered in order)."""
from __future__ import annotations

import torch
from accelerate.utils import find_executable_batch_size

from ..autoencoder.vae import decode_latents
from ..config import EvalConfig
from ..errors import UserError
from ..diffusion import sample_from_config
from .conditioning import null_context, prompt_context
from .pipeline import Pipeline


@torch.no_grad()
def generate(
    pipe: Pipeline,
    prompts: list[str],
    eval_cfg: EvalConfig,
    device,
    batch_size: int | None = None,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """``samples_per_prompt`` images for each prompt, seeded by ``eval_cfg.seed``.

    Every sample's initial noise is drawn from one seeded stream for the whole list, and rank r
    samples indices r, r + world_size, ...; so with a deterministic sampler (DDIM eta=0, the ODE
    samplers) the images do not depend on the number of processes. Stochastic samplers draw their
    per-step noise from a per-batch generator seeded by (seed, first index). ``negative_prompt``'s
    embedding replaces the empty caption's as the unconditional context of classifier-free
    guidance; ``height``/``width`` (pixels, see :func:`latent_shape`; each None: ``eval.height`` /
    ``eval.width``) replace the trained size: with data.buckets, sample at any bucket's size.
    Returns (this rank's images NCHW in [-1, 1] on the CPU, their captions)."""
    captions = [p for p in prompts for _ in range(eval_cfg.samples_per_prompt)]
    gen = torch.Generator(device=device).manual_seed(eval_cfg.seed)
    height, width = sample_size(eval_cfg, height, width)
    shape = latent_shape(pipe, height, width)
    noise_all = torch.randn((len(captions), *shape), generator=gen, device=device)
    mine = list(range(rank, len(captions), world_size))
    null = null_context(pipe.unet, pipe.text, negative_prompt)
    size_hw = (shape[1] * downsampling_factor(pipe.vae), shape[2] * downsampling_factor(pipe.vae))

    @find_executable_batch_size(starting_batch_size=batch_size or eval_cfg.batch_size)
    def sample_all(size: int) -> tuple[list, list]:  # called again with size // 2 after a CUDA OOM
        images, mine_captions = [], []
        for i in range(0, len(mine), size):
            idx = mine[i : i + size]
            chunk = [captions[j] for j in idx]
            step_gen = torch.Generator(device=device).manual_seed(eval_cfg.seed * 1_000_003 + idx[0] + 1)
            z = sample_from_config(pipe.unet, noise_all[idx], prompt_context(pipe.unet, pipe.text, chunk, size_hw), null, pipe.diffusion, eval_cfg,
                                   generator=step_gen, progress=progress)
            images.append(decode_latents(pipe.vae, z).cpu())
            mine_captions += chunk
        return images, mine_captions

    images, mine_captions = sample_all() if mine else ([], [])
    if not images:
        return torch.empty(0, 3, 0, 0), []
    return torch.cat(images), mine_captions


def sample_size(eval_cfg: EvalConfig, height: int | None, width: int | None) -> tuple[int | None, int | None]:
    """(height, width) in pixels: the arguments (``sample --height/--width``) where given, else
    ``eval.height``/``eval.width`` (None: the trained size)."""
    return (height if height is not None else eval_cfg.height, width if width is not None else eval_cfg.width)


def downsampling_factor(vae) -> int:
    """Pixels per latent cell along each side: 2 per down block of the autoencoder but the last."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(pipe: Pipeline, height: int | None = None, width: int | None = None) -> list[int]:
    """The latent (C, H, W) for an image of ``height`` x ``width`` pixels (each None: the trained
    size). Refuses a size that is not a positive multiple of the autoencoder's downsampling factor,
    naming the flag (``--height``/``--width``)."""
    channels, h, w = pipe.latent_shape
    factor = downsampling_factor(pipe.vae)
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and (value <= 0 or value % factor):
            raise UserError(f"{flag} {value}: must be a positive multiple of {factor}, the autoencoder's "
                            f"downsampling factor (trained size {h * factor}x{w * factor})")
    return [channels, h if height is None else height // factor, w if width is None else width // factor]
