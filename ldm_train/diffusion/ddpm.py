"""DDPM ancestral sampling, with Improved DDPM respacing and learned variance.

Papers: DDPM (Ho, Jain, Abbeel 2020), Improved DDPM (Nichol & Dhariwal 2021), GLIDE (Nichol et al.
2022) for guidance with learned variance, classifier-free guidance (Ho & Salimans 2022).

Code name            -> paper symbol
``timesteps``        -> the respaced subsequence S = (S_1 > ... > S_K) of {0..T-1} (Improved DDPM sec. 4)
``alpha_bar``        -> ᾱ_t = ᾱ_{S_i};  ``alpha_bar_prev`` -> ᾱ_{S_{i+1}}, or 1 after the last step
``beta``             -> β_t of the respaced chain, 1 - ᾱ_t / ᾱ_prev (Improved DDPM sec. 4; = β_t when K = T)
``beta_tilde``       -> β̃_t = (1 - ᾱ_prev) / (1 - ᾱ_t) · β_t, the posterior variance (DDPM eq. 7)
``mean``             -> μ̃_t(x_t, x̂_0), the posterior mean (DDPM eq. 7)
``x0``               -> x̂_0 from the model output (ε: DDIM eq. 9; v: Salimans & Ho sec. 4; sample)
``v``                -> the learned-variance output v ∈ [-1, 1] (Nichol & Dhariwal eq. 15 uses
                        v ∈ [0, 1]; like their code we map it with (v + 1) / 2)
``variance``         -> σ_t²: β̃_t ("fixed_small"), β_t ("fixed_large") or
                        exp(frac log β_t + (1 - frac) log β̃_t), frac = (v + 1)/2 ("learned_range")
``z``                -> z ~ N(0, I) (DDPM Alg. 2, z = 0 on the last step)

The timesteps are ``ddim_timesteps(T, steps, spacing, steps_offset)``; the default ("leading",
offset 0) is diffusers' ``DDPMScheduler`` default, ending at t = 0. ``steps=None`` uses all T steps.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from ldm_train.diffusion.denoisers import cfg_model
from ldm_train.diffusion.losses import Denoiser
from ldm_train.diffusion.samplers import Spacing, ddim_timesteps
from ldm_train.diffusion.schedule import NoiseSchedule

Variance = Literal["fixed_small", "fixed_large", "learned_range"]


def ddpm_timesteps(num_train_timesteps: int, steps: int | None, spacing: Spacing = "leading",
                   steps_offset: int = 0) -> torch.Tensor:
    """Descending int64 timesteps ``[K]``: all T for ``steps=None``, else :func:`ddim_timesteps`."""
    if steps is None:
        return torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
    return ddim_timesteps(num_train_timesteps, steps, spacing, steps_offset)


def x0_from_output(out: torch.Tensor, x_t: torch.Tensor, alpha_bar: float, prediction_type: str) -> torch.Tensor:
    """x̂_0 from the network output at ᾱ_t (a Python float, float64 maths)."""
    sa, s1a = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if prediction_type == "epsilon":
        if alpha_bar == 0:
            raise ValueError("epsilon prediction cannot give x_0 at ᾱ_t = 0 (zero terminal SNR); "
                             "use v_prediction or sample")
        return (x_t - s1a * out) / sa  # DDIM eq. 9
    if prediction_type == "v_prediction":
        return sa * x_t - s1a * out  # Salimans & Ho sec. 4
    if prediction_type == "sample":
        return out
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def ddpm_step(
    x_t: torch.Tensor,
    x0: torch.Tensor,
    alpha_bar: float,
    alpha_bar_prev: float,
    variance: Variance = "fixed_small",
    v: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One ancestral step x_t -> x_prev ~ N(μ̃_t(x_t, x̂_0), σ_t² I) (DDPM eq. 6-7, Alg. 2).

    ``alpha_bar``/``alpha_bar_prev`` are Python floats; β_t = 1 - ᾱ_t/ᾱ_prev (respaced chain).
    ``v`` is the learned-variance output (only for ``learned_range``); ``noise`` z or None (mean only)."""
    beta = 1 - alpha_bar / alpha_bar_prev  # Improved DDPM sec. 4 (respacing)
    alpha = 1 - beta
    # DDPM eq. 7: μ̃ = sqrt(ᾱ_prev) β / (1 - ᾱ_t) x̂_0 + sqrt(α_t) (1 - ᾱ_prev) / (1 - ᾱ_t) x_t
    c0 = math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)
    ct = math.sqrt(alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar)
    mean = c0 * x0 + ct * x_t
    if noise is None:
        return mean
    beta_tilde = max((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, 1e-20)  # DDPM eq. 7 (clamped like diffusers)
    if variance == "fixed_small":
        std = math.sqrt(beta_tilde)  # DDPM sec. 3.2, σ_t² = β̃_t
    elif variance == "fixed_large":
        std = math.sqrt(beta)  # DDPM sec. 3.2, σ_t² = β_t
    elif variance == "learned_range":
        if v is None:
            raise ValueError("learned_range needs the model's variance output v")
        frac = (v + 1) / 2  # v ∈ [-1, 1] -> [0, 1]
        # Nichol & Dhariwal eq. 15: Σ = exp(v log β_t + (1 - v) log β̃_t)
        log_var = frac * math.log(beta) + (1 - frac) * math.log(beta_tilde)
        return mean + torch.exp(0.5 * log_var) * noise
    else:
        raise ValueError(f"unknown variance {variance!r}; expected fixed_small, fixed_large or learned_range")
    return mean + std * noise


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="DDPM", leave=False)


@torch.no_grad()
def ddpm_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor | None,
    schedule: NoiseSchedule,
    steps: int | None = None,
    guidance_scale: float = 1.0,
    prediction_type: str = "epsilon",
    variance: Variance = "fixed_small",
    generator: torch.Generator | None = None,
    progress: bool = False,
    spacing: Spacing = "leading",
    steps_offset: int = 0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample x_0 from x_T = ``noise`` by ancestral sampling (DDPM Alg. 2) on ``steps`` respaced steps.

    ``denoiser(x_t, t, context)`` returns ε, v or x_0 (``prediction_type``); for ``learned_range`` it
    returns 2C channels, the second C being v ∈ [-1, 1]. With ``guidance_scale != 1`` one call per step
    on [∅, c] guides the mean channels only (:func:`cfg_model`). z ~ N(0, I) comes from ``generator``
    (on ``noise``'s device) at every step but the last, in the order diffusers' ``DDPMScheduler`` draws it.
    ``callback(i, x)`` is called after step i."""
    if variance not in ("fixed_small", "fixed_large", "learned_range"):
        raise ValueError(f"unknown variance {variance!r}; expected fixed_small, fixed_large or learned_range")
    T, device, C = schedule.num_train_timesteps, noise.device, noise.shape[1]
    timesteps = ddpm_timesteps(T, steps, spacing, steps_offset)
    table = schedule.alphas_cumprod.tolist()
    f = cfg_model(denoiser, context, null_context, guidance_scale)
    x = noise
    K = len(timesteps)
    for i, t_int in enumerate(_progress(timesteps, progress)):
        t = torch.full((x.shape[0],), int(t_int), dtype=torch.int64, device=device)
        out = f(x, t)
        if variance == "learned_range" and out.shape[1] != 2 * C:
            raise ValueError(f"learned_range needs {2 * C} output channels, got {out.shape[1]}")
        alpha_bar = table[int(t_int)]
        alpha_bar_prev = table[int(timesteps[i + 1])] if i + 1 < K else 1.0
        x0 = x0_from_output(out[:, :C], x, alpha_bar, prediction_type)
        z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype) if i + 1 < K else None
        v = out[:, C:] if variance == "learned_range" else None
        x = ddpm_step(x, x0, alpha_bar, alpha_bar_prev, variance, v, z)
        if callback is not None:
            callback(i, x)
    return x
