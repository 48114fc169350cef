"""DDIM sampling with classifier-free guidance, as pure functions of a denoiser (k-diffusion style).

Papers: DDIM (Song, Meng, Ermon 2021), classifier-free guidance (Ho & Salimans 2022).

Code name           -> paper symbol
``alphas_cumprod``  -> ᾱ_t (DDIM writes it α_t; we keep DDPM's bar notation)
``x_t``             -> x_t, the current sample;  ``noise`` -> x_T ~ N(0, I)
``x0``              -> f_θ(x_t) = x̂_0, "predicted x_0" (DDIM eq. 9)
``eps``             -> ε_θ(x_t, t)
``sigma``           -> σ_t(η) (DDIM eq. 16); η = ``eta``: 0 = deterministic DDIM, 1 = DDPM-like
``guidance_scale``  -> s = 1 + w (Ho & Salimans eq. 6): ε̃ = ε(∅) + s (ε(c) - ε(∅))

Timesteps (``ddim_timesteps``) follow diffusers' DDIMScheduler: ``leading`` spacing with
``steps_offset=1`` (Stable Diffusion's setting; T=1000, 50 steps -> 981, 961, ..., 1) or
``trailing`` spacing (offset ignored; -> 999, 979, ..., 19). The step from timesteps[i] goes to
timesteps[i+1]; the last step goes to ᾱ_prev = 1 by default (diffusers ``set_alpha_to_one=True``),
so the sampler returns the final x̂_0 exactly. ``set_alpha_to_one=False`` uses ᾱ_prev = ᾱ_0 (SD's
config) for step-exact parity with SD pipelines. diffusers computes the previous timestep as
t - T // steps; that equals timesteps[i+1] except for ``trailing`` spacing when T % steps != 0.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from ldm_train.diffusion.losses import Denoiser, drop_context
from ldm_train.diffusion.schedule import NoiseSchedule, PredictionType

Spacing = Literal["leading", "trailing", "quadratic"]


def ddim_timesteps(
    num_train_timesteps: int, steps: int, spacing: Spacing = "leading", steps_offset: int = 1
) -> torch.Tensor:
    """Descending int64 timesteps ``[steps]``, identical to diffusers' ``DDIMScheduler.set_timesteps``
    with the same ``timestep_spacing`` and ``steps_offset`` (Lin et al. 2023, Table 2)."""
    T = num_train_timesteps
    if not 0 < steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "leading":
        ts = torch.arange(steps, dtype=torch.int64) * (T // steps) + steps_offset
    elif spacing == "trailing":
        # float ratio T/steps; torch.round rounds half to even like numpy, as diffusers does
        ts = torch.arange(steps, dtype=torch.float64) * (T / steps)
        return torch.round(T - ts).to(torch.int64) - 1
    elif spacing == "quadratic":
        # DDIM sec. 5 / App. D.2 (their CIFAR-10 setting): tau_i = floor((sqrt(0.8 T) i / (S-1))^2),
        # dense near t = 0; the offset keeps the timesteps distinct when S is close to T.
        ts = (torch.linspace(0, math.sqrt(T * 0.8), steps, dtype=torch.float64) ** 2).floor().to(torch.int64)
        ts = torch.maximum(ts, torch.arange(steps, dtype=torch.int64))
        if ts.unique().numel() != steps:
            raise ValueError(f"quadratic spacing gives repeated timesteps for {steps} of {T}; use fewer steps")
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected leading, trailing or quadratic")
    if ts.max() >= T:
        raise ValueError(f"steps_offset={steps_offset} pushes timestep {int(ts.max())} past T-1={T - 1}; "
                         "use fewer steps or spacing='trailing'")
    return ts.flip(0)


def guided_prediction(
    denoiser: Denoiser,
    x_t: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor | None,
    schedule: NoiseSchedule,
    guidance_scale: float,
    prediction_type: PredictionType,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̃_0, ε̃) at x_t: conditional, or with guidance ε(∅) + s (ε(c) - ε(∅)) (Ho & Salimans
    eq. 6) from one denoiser call on the batch [uncond, cond]. x̂_0 and ε are both affine in the
    network output for fixed x_t, so guiding each is the same guidance; returning x̂_0 directly
    (rather than recomputing it from ε) keeps ᾱ_t = 0 (zero terminal SNR) finite."""
    if guidance_scale == 1.0:
        return schedule.pred_to_x0_eps(denoiser(x_t, t, context), x_t, t, prediction_type)
    if null_context is None:
        raise ValueError("guidance_scale != 1 needs a null_context")
    B = x_t.shape[0]
    null = drop_context(context, null_context, torch.ones(B, dtype=torch.bool, device=context.device))
    x_in, t_in = torch.cat([x_t, x_t]), torch.cat([t, t])
    out = denoiser(x_in, t_in, torch.cat([null, context]))
    x0, eps = schedule.pred_to_x0_eps(out, x_in, t_in, prediction_type)
    (x0_u, x0_c), (eps_u, eps_c) = x0.chunk(2), eps.chunk(2)
    return x0_u + guidance_scale * (x0_c - x0_u), eps_u + guidance_scale * (eps_c - eps_u)


def guided_eps(*args, **kwargs) -> torch.Tensor:
    """ε̃ only (see :func:`guided_prediction`)."""
    return guided_prediction(*args, **kwargs)[1]


def ddim_step(
    x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: float, alpha_bar_prev: float, eta: float,
    noise: torch.Tensor | None, x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update x_t -> x_{t_prev} (DDIM eq. 12) with σ_t(η) from eq. 16.

    ``alpha_bar``/``alpha_bar_prev`` are ᾱ_t, ᾱ_prev as Python floats (float64 math, no device
    transfers); ``noise`` is z ~ N(0, I), or None for η = 0. ``x0`` (x̂_0) is derived from ε
    when not given, which needs ᾱ_t > 0."""
    if x0 is None:
        x0 = (x_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)  # eq. 9, predicted x_0
    # eq. 16: σ_t = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev)
    sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
    # eq. 12: x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ²) ε_θ + σ z
    direction = math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0))
    x_prev = math.sqrt(alpha_bar_prev) * x0 + direction * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


def _progress(items: torch.Tensor, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="DDIM", leave=False)


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor | None,
    schedule: NoiseSchedule,
    steps: int,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    prediction_type: PredictionType = "epsilon",
    generator: torch.Generator | None = None,
    progress: bool = False,
    spacing: Spacing = "leading",
    set_alpha_to_one: bool = True,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample x_0 from x_T = ``noise`` with ``steps`` DDIM steps (Song et al. 2021, eq. 12).

    ``denoiser(x_t, t, context)`` returns ε or v (``prediction_type``). With ``guidance_scale != 1``
    it is called once per step on the doubled batch [uncond, cond] (see :func:`guided_eps`).
    For η > 0 fresh z ~ N(0, I) comes from ``generator`` (on ``noise``'s device) at every step,
    so equal ``noise`` and generator seed give bitwise-equal samples. ``callback(i, x)`` is
    called after step i.
    """
    T, device = schedule.num_train_timesteps, noise.device
    timesteps = ddim_timesteps(T, steps, spacing)
    table = schedule.alphas_cumprod.tolist()
    final = 1.0 if set_alpha_to_one else table[0]
    x = noise
    for i, t_int in enumerate(_progress(timesteps, progress)):
        t = torch.full((x.shape[0],), int(t_int), dtype=torch.int64, device=device)
        x0, eps = guided_prediction(denoiser, x, t, context, null_context, schedule, guidance_scale, prediction_type)
        alpha_bar_prev = table[int(timesteps[i + 1])] if i + 1 < steps else final
        z = None
        if eta > 0:
            z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        x = ddim_step(x, eps, table[int(t_int)], alpha_bar_prev, eta, z, x0)
        if callback is not None:
            callback(i, x)
    return x
