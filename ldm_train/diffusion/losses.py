"""The denoising training objective (DDPM eq. 14, "L_simple") with classifier-free guidance dropout.

Code name        -> paper symbol
``x0``           -> x_0, clean latents                      (DDPM)
``eps``          -> ε ~ N(0, I)                             (DDPM eq. 14)
``x_t``          -> sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε          (DDPM eq. 4)
``v``            -> sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0          (Salimans & Ho 2022)
``context``      -> c, the text conditioning (cross-attention keys/values)
``null_context`` -> ∅, the "null" token sequence used for unconditional training (Ho & Salimans 2022)
``cond_drop_prob`` -> p_uncond (Ho & Salimans 2022, Algorithm 1)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ldm_train.diffusion.schedule import NoiseSchedule, PredictionType

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def drop_context(
    context: torch.Tensor, null_context: torch.Tensor, drop: torch.Tensor
) -> torch.Tensor:
    """Replace ``context[i]`` by ``null_context`` where ``drop[i]`` (bool ``[B]``).

    ``null_context`` is ``[L, D]`` or ``[1, L, D]`` and broadcasts over the batch."""
    null = null_context.to(device=context.device, dtype=context.dtype).expand_as(context)
    mask = drop.view(-1, *([1] * (context.dim() - 1)))
    return torch.where(mask, null, context)


def _check_generator(generator: torch.Generator | None, x0: torch.Tensor) -> None:
    if generator is not None and generator.device.type != x0.device.type:
        raise ValueError(f"generator is on {generator.device} but x0 is on {x0.device}; they must match")


def diffusion_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor,
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    cond_drop_prob: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Monte-Carlo estimate of E_{t, ε} || target - denoiser(x_t, t, c) ||^2 (DDPM eq. 14).

    t ~ U{0..T-1}, ε ~ N(0, I) and the per-sample context-drop mask (Ho & Salimans Alg. 1) are
    all drawn from ``generator`` in that order, so a seeded generator reproduces the loss exactly.
    ``generator`` must live on ``x0``'s device. The target is ε or v (``prediction_type``); the MSE
    is computed in float32 and averaged over every element.

    Returns ``(loss, stats)``; ``stats`` holds detached 0-dim tensors (no host sync here):
    ``loss``, ``t_mean`` and ``cond_drop_frac``.
    """
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
    _check_generator(generator, x0)
    B, device = x0.shape[0], x0.device
    t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=generator, device=device)
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    drop = torch.rand(B, generator=generator, device=device) < cond_drop_prob  # p=1 -> always, p=0 -> never
    x_t = schedule.add_noise(x0, eps, t)  # DDPM eq. 4
    out = denoiser(x_t, t, drop_context(context, null_context, drop))
    target = schedule.target(x0, eps, t, prediction_type)
    loss = F.mse_loss(out.float(), target.float())
    stats = {
        "loss": loss.detach(),
        "t_mean": t.float().mean(),
        "cond_drop_frac": drop.float().mean(),
    }
    return loss, stats
