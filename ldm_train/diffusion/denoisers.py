"""Bridges from a discrete-time network to the continuous (k-diffusion style) samplers.

Papers: DDPM (Ho et al. 2020), EDM (Karras et al. 2022), classifier-free guidance (Ho & Salimans
2022), v-prediction (Salimans & Ho 2022); k-diffusion's ``DiscreteSchedule`` for t(σ).

Code name             -> paper symbol
``model``             -> the network ε_θ / v_θ / x_θ(x_t, t, c), called ``model(x_t, t, context)``
``cfg_model``         -> x_t, t ↦ guided output  o(∅) + s (o(c) - o(∅))   (Ho & Salimans eq. 6)
``x``                 -> EDM's variance-exploding sample x = x_0 + σ ε            (EDM eq. 1-2, s(t) = 1)
``x_t``               -> DDPM's sample x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε = x / sqrt(1 + σ²)
``sigma``             -> σ = sqrt((1 - ᾱ_t) / ᾱ_t)  (so ᾱ = 1 / (1 + σ²); EDM Table 1, "VP" column)
``D``                 -> D_θ(x; σ), the denoiser that returns x̂_0                  (EDM eq. 2-3)
``sigma_to_t``        -> t(σ): fractional timestep by linear interpolation of log σ_t between
                         neighbouring integer t (k-diffusion ``DiscreteSchedule.sigma_to_t``,
                         diffusers ``_sigma_to_t``); ``quantize=True`` rounds it (diffusers'
                         DPMSolverMultistepScheduler rounds its Karras timesteps)

Guidance space: for fixed (x_t, t) the ε, v and x_0 parameterisations are affine functions of each
other (DDIM eq. 9; Salimans & Ho sec. 4) and classifier-free guidance is an affine combination
(weights 1 - s and s sum to one), so guiding in the network's own output space is *identical* to
guiding in ε space as ``samplers.guided_eps`` does. ``cfg_model`` therefore guides the raw output.
With learned variance (output has 2C channels for a C-channel sample) only the first C (mean)
channels are guided; the variance channels come from the conditional pass (GLIDE's choice).
"""
from __future__ import annotations

from typing import Callable

import torch

from ldm_train.diffusion.losses import Denoiser, drop_context
from ldm_train.diffusion.schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SigmaDenoiser = Callable[[torch.Tensor, "torch.Tensor | float"], torch.Tensor]
MIN_ALPHA_BAR = 2.0**-24  # diffusers' floor for ᾱ_{T-1} under zero terminal SNR


def cfg_model(
    model: Denoiser,
    context: torch.Tensor,
    null_context: torch.Tensor | None,
    guidance_scale: float = 1.0,
) -> ModelFn:
    """``f(x_t, t) -> output``: one network call per evaluation, on the doubled batch [∅, c] when
    ``guidance_scale != 1`` (Ho & Salimans eq. 6, guided in output space, see module docstring).

    ``t`` may be a 0-dim or ``[B]`` tensor, integer or fractional; it is passed on unchanged
    (expanded to ``[B]``). Output channels beyond the sample's C (learned variance) are not guided."""
    if guidance_scale != 1.0 and null_context is None:
        raise ValueError("guidance_scale != 1 needs a null_context")

    def f(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, C = x_t.shape[0], x_t.shape[1]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(B) if t.dim() == 0 else t
        if guidance_scale == 1.0:
            return model(x_t, t, context)
        null = drop_context(context, null_context, torch.ones(B, dtype=torch.bool, device=context.device))
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null, context]))
        out_u, out_c = out.chunk(2)
        mean_u, mean_c = out_u[:, :C], out_c[:, :C]
        guided = mean_u + guidance_scale * (mean_c - mean_u)  # Ho & Salimans eq. 6
        if out_c.shape[1] > C:  # learned variance: keep the conditional variance channels (GLIDE)
            guided = torch.cat([guided, out_c[:, C:]], dim=1)
        return guided

    return f


def discrete_sigmas(schedule: NoiseSchedule) -> torch.Tensor:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) for t = 0..T-1, float64 ``[T]``, ascending (EDM Table 1, VP).

    ᾱ_{T-1} = 0 (zero terminal SNR) would give σ_{T-1} = inf; like diffusers' Euler and DPM-Solver
    schedulers we floor ᾱ at ``MIN_ALPHA_BAR`` = 2^-24, so σ_{T-1} ≈ 4096 stays finite."""
    ac = schedule.alphas_cumprod.to(torch.float64).clamp(min=MIN_ALPHA_BAR)
    return ((1 - ac) / ac).sqrt()


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """Fractional timestep t(σ) by interpolating linearly in log σ between the two neighbouring
    discrete levels of ``sigmas`` (ascending ``[T]``); clamped to [0, T-1]. Same maths as
    k-diffusion's ``DiscreteSchedule.sigma_to_t`` and diffusers' ``_sigma_to_t``. float64."""
    log_sigmas = sigmas.to(torch.float64).log()
    log_sigma = sigma.to(torch.float64).clamp(min=1e-10).log()
    dists = log_sigma.reshape(1, -1) - log_sigmas.reshape(-1, 1)
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
    t = (1 - w) * low + w * high
    if quantize:
        t = t.round()
    return t.reshape(sigma.shape)


def x0_denoiser(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    quantize: bool = False,
) -> SigmaDenoiser:
    """``D(x, σ) -> x̂_0`` in EDM/VE coordinates (x = x_0 + σ ε) from a discrete-time ``model_fn(x_t, t)``
    (e.g. :func:`cfg_model`).

    The network sees x_t = x / sqrt(1 + σ²) (EDM's c_in for the VP-trained net) and t(σ) from
    :func:`sigma_to_t` as a float32 tensor ``[B]`` (rounded if ``quantize``). Its output is
    converted with ᾱ = 1/(1+σ²), i.e. sqrt(ᾱ) = 1/sqrt(1+σ²), sqrt(1-ᾱ) = σ/sqrt(1+σ²):
    ``epsilon``: D = x - σ ε̂ (EDM eq. 2 with x = x_0 + σ ε);
    ``v_prediction``: D = sqrt(ᾱ) x_t - sqrt(1-ᾱ) v̂ = x/(1+σ²) - σ v̂/sqrt(1+σ²) (Salimans & Ho sec. 4);
    ``sample``: D = x̂_0. Learned-variance channels beyond C are dropped.
    ``sigma`` is a float, a 0-dim or a ``[B]`` tensor; it must be finite and > 0.
    """
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")
    sigmas = discrete_sigmas(schedule)

    def D(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        B, C = x.shape[0], x.shape[1]
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(B).cpu()
        t = sigma_to_t(s, sigmas, quantize).to(device=x.device, dtype=torch.float32)
        s_b = s.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
        c_in = 1 / (s_b**2 + 1).sqrt()
        out = model_fn(x * c_in, t)[:, :C]
        if prediction_type == "epsilon":
            return x - s_b * out
        if prediction_type == "v_prediction":
            return x / (s_b**2 + 1) - s_b * c_in * out
        return out

    return D


__all__ = ["cfg_model", "discrete_sigmas", "sigma_to_t", "x0_denoiser"]
