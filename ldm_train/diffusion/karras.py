"""Samplers on the EDM σ grid (Karras et al. 2022) and DPM-Solver++(2M) (Lu et al. 2022), k-diffusion style.

Papers: "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM; Karras, Aittala,
Aila, Laine 2022), "DPM-Solver++" (Lu, Zhou, Bao, Chen, Li, Zhu 2022); k-diffusion (Crowson) for
the reference implementations ``get_sigmas_karras``, ``sample_euler``, ``sample_heun``,
``sample_dpmpp_2m``.

Code name          -> paper symbol
``D``              -> D_θ(x; σ) -> x̂_0, the denoiser (EDM eq. 2-3); called ``D(x, sigma)`` with a
                      Python float σ > 0 (see ``denoisers.x0_denoiser`` for a network-backed D)
``x``              -> x_i, sample with x = x_0 + σ ε (EDM: s(t) = 1, σ(t) = t)
``sigmas``         -> t_0 > t_1 > ... > t_{N-1} > t_N = 0 (EDM eq. 5; EDM writes the noise level as t)
``rho``            -> ρ (EDM eq. 5; 7 by default)
``d``              -> dx/dσ = (x - D(x; σ)) / σ, the probability-flow ODE (EDM eq. 3 / Alg. 2 line 7)
``s_churn`` ...    -> S_churn, S_tmin, S_tmax, S_noise (EDM Alg. 2); γ_i = min(S_churn/N, √2 - 1)
``sigma_hat``      -> t̂_i = (1 + γ_i) t_i (EDM Alg. 2 line 5)
``t`` (DPM++)      -> λ = -log σ (log-SNR/2 in VE form); ``h`` -> h_i = λ_{i+1} - λ_i (DPM-Solver++)
``r``              -> r_i = h_{i-1} / h_i (DPM-Solver++ Alg. 2)

Every sampler starts from ``x = noise * sigmas[0]`` and returns x at σ = sigmas[-1] (normally 0).
Classifier-free guidance enters through D (``x0_denoiser(cfg_model(...))``); :func:`karras_sample`
wires a network, guidance and a schedule to these samplers.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from ldm_train.diffusion.denoisers import SigmaDenoiser, cfg_model, discrete_sigmas, x0_denoiser
from ldm_train.diffusion.losses import Denoiser
from ldm_train.diffusion.schedule import NoiseSchedule

Callback = Callable[[int, torch.Tensor], None]


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM eq. 5: σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, i = 0..n-1, then σ_n = 0.

    float64 ``[n + 1]``, descending (k-diffusion ``get_sigmas_karras``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _churn(x, sigma, n, generator, s_churn, s_tmin, s_tmax, s_noise):
    """EDM Alg. 2 lines 4-6: raise σ_i to t̂_i = (1 + γ_i) σ_i by adding fresh noise."""
    gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0  # line 4
    sigma_hat = sigma * (1 + gamma)  # line 5
    if gamma > 0:
        # line 6: x̂ = x + sqrt(t̂² - t²) ε, ε ~ N(0, S_noise² I)
        x = x + _randn(x, generator) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


@torch.no_grad()
def sample_euler(
    D: SigmaDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """EDM Alg. 2 with the Euler step only (lines 7-8): first order, N = len(sigmas) - 1 evaluations."""
    s = [float(v) for v in sigmas]
    n = len(s) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, s[i], n, generator, s_churn, s_tmin, s_tmax, s_noise)
        d = (x - D(x, sigma_hat)) / sigma_hat  # line 7: d_i = (x̂_i - D(x̂_i; t̂_i)) / t̂_i
        x = x + (s[i + 1] - sigma_hat) * d  # line 8: x_{i+1} = x̂_i + (t_{i+1} - t̂_i) d_i
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_heun(
    D: SigmaDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """EDM Alg. 2 in full: Euler predictor plus the trapezoidal (Heun) correction, second order;
    the last step to σ = 0 stays Euler (line 9). 2N - 1 evaluations for N steps ending at 0."""
    s = [float(v) for v in sigmas]
    n = len(s) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, s[i], n, generator, s_churn, s_tmin, s_tmax, s_noise)
        d = (x - D(x, sigma_hat)) / sigma_hat  # line 7
        dt = s[i + 1] - sigma_hat
        x_next = x + dt * d  # line 8 (Euler predictor)
        if s[i + 1] != 0:  # line 9
            d_prime = (x_next - D(x_next, s[i + 1])) / s[i + 1]  # line 10
            x_next = x + dt * (0.5 * d + 0.5 * d_prime)  # line 11 (trapezoidal rule)
        x = x_next
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    D: SigmaDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, data prediction, multistep), as k-diffusion's
    ``sample_dpmpp_2m``: first order on the first step and on the last step to σ = 0."""
    s = [float(v) for v in sigmas]
    old_denoised: torch.Tensor | None = None
    h_last = 0.0
    for i in range(len(s) - 1):
        denoised = D(x, s[i])
        if s[i + 1] == 0:
            x = denoised  # λ_{i+1} = +inf: the first-order update below gives exactly x̂_0
        else:
            h = math.log(s[i]) - math.log(s[i + 1])  # h_i = λ_{i+1} - λ_i, λ = -log σ
            if old_denoised is None:
                d = denoised  # DPM-Solver++(1) = DDIM (Lu et al. eq. 9 with k = 1)
            else:
                r = h_last / h  # r_i = h_{i-1} / h_i
                # Alg. 2: D_i = (1 + 1/(2 r_i)) x̂_0^{(i)} - 1/(2 r_i) x̂_0^{(i-1)}
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            # x_{i+1} = (σ_{i+1}/σ_i) x_i - (e^{-h_i} - 1) D_i   (VE form of Lu et al. eq. 10)
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, x)
    return x


KarrasSampler = Literal["euler", "heun", "dpmpp_2m"]


@torch.no_grad()
def karras_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor | None,
    schedule: NoiseSchedule,
    steps: int,
    sampler: KarrasSampler = "euler",
    guidance_scale: float = 1.0,
    prediction_type: str = "epsilon",
    rho: float = 7.0,
    generator: torch.Generator | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    quantize_timesteps: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Sample x_0 with a network ``denoiser(x_t, t, context)`` on the Karras grid between the
    schedule's σ_min = σ_0 and σ_max = σ_{T-1} (:func:`discrete_sigmas`), with classifier-free
    guidance (:func:`cfg_model`) and D from :func:`x0_denoiser`. ``noise`` is ε ~ N(0, I)."""
    sig = discrete_sigmas(schedule)
    sigmas = karras_sigmas(steps, float(sig[0]), float(sig[-1]), rho)
    D = x0_denoiser(cfg_model(denoiser, context, null_context, guidance_scale), schedule, prediction_type,
                    quantize=quantize_timesteps)
    x = noise * float(sigmas[0])
    if sampler == "dpmpp_2m":
        return sample_dpmpp_2m(D, x, sigmas, callback=callback)
    if sampler in ("euler", "heun"):
        fn = sample_euler if sampler == "euler" else sample_heun
        return fn(D, x, sigmas, generator, s_churn, s_tmin, s_tmax, s_noise, callback)
    raise ValueError(f"unknown sampler {sampler!r}; expected euler, heun or dpmpp_2m")
