"""Samplers on the EDM σ grid (Karras et al. 2022) and DPM-Solver++(2M) (Lu et al. 2022), k-diffusion style.

Papers: "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM; Karras, Aittala,
Aila, Laine 2022), "DPM-Solver++" (Lu, Zhou, Bao, Chen, Li, Zhu 2022); k-diffusion (Crowson) for
the reference implementations ``get_sigmas_karras``, ``sample_euler``, ``sample_heun``,
``sample_dpmpp_2m``.

Code name          -> paper symbol
``D``              -> D_θ(x; σ) -> x̂_0, the denoiser (EDM eq. 2-3); called ``D(x, sigma)`` with a
                      Python float σ > 0 (``parameterization.sigma_denoiser`` makes one of a network)
``x``              -> x_i, sample with x = x_0 + σ ε (EDM: s(t) = 1, σ(t) = t)
``sigmas``         -> t_0 > t_1 > ... > t_{N-1} > t_N = 0 (EDM eq. 5; EDM writes the noise level as t)
``rho``            -> ρ (EDM eq. 5; 7 by default)
``d``              -> dx/dσ = (x - D(x; σ)) / σ, the probability-flow ODE (EDM eq. 3 / Alg. 2 line 7)
``s_churn`` ...    -> S_churn, S_tmin, S_tmax, S_noise (EDM Alg. 2); γ_i = min(S_churn/N, √2 - 1)
``sigma_hat``      -> t̂_i = (1 + γ_i) t_i (EDM Alg. 2 line 5)
``t`` (DPM++)      -> λ = -log σ (log-SNR/2 in VE form); ``h`` -> h_i = λ_{i+1} - λ_i (DPM-Solver++)
``r``              -> r_i = h_{i-1} / h_i (DPM-Solver++ Alg. 2)

Every sampler starts from ``x = noise * sigmas[0]`` and returns x at σ = sigmas[-1] (normally 0).
Classifier-free guidance and the parameterisation enter through D, built outside (see
:mod:`ldm_train.diffusion.samplers`).
"""
from __future__ import annotations

import math
from typing import Annotated, Callable

import torch
from pydantic import Field

from ldm_train.diffusion.parameterization import SigmaDenoiser, discrete_sigmas
from ldm_train.diffusion.schedule import NoiseSchedule

Callback = Callable[[int, torch.Tensor], None]
NonNegative = Annotated[float, Field(ge=0)]


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


def karras_grid(schedule: NoiseSchedule, steps: int, *, rho: Annotated[float, Field(gt=0)] = 7.0) -> torch.Tensor:
    """EDM's grid between the schedule's σ_min = σ_0 and σ_max = σ_{T-1} (``discrete_sigmas``)."""
    sig = discrete_sigmas(schedule)
    return karras_sigmas(steps, float(sig[0]), float(sig[-1]), rho)


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


def _alg2(D, x, sigmas, generator, callback, churn: tuple, heun: bool) -> torch.Tensor:
    """EDM Alg. 2: churn (lines 4-6), the Euler step (7-8) and, with ``heun``, the trapezoidal
    correction (9-11) on every step but the last to σ = 0."""
    s = [float(v) for v in sigmas]
    n = len(s) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, s[i], n, generator, *churn)
        d = (x - D(x, sigma_hat)) / sigma_hat  # line 7: d_i = (x̂_i - D(x̂_i; t̂_i)) / t̂_i
        dt = s[i + 1] - sigma_hat
        x_next = x + dt * d  # line 8: x_{i+1} = x̂_i + (t_{i+1} - t̂_i) d_i
        if heun and s[i + 1] != 0:  # line 9
            d_prime = (x_next - D(x_next, s[i + 1])) / s[i + 1]  # line 10
            x_next = x + dt * (0.5 * d + 0.5 * d_prime)  # line 11 (trapezoidal rule)
        x = x_next
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_euler(D: SigmaDenoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None, callback=None,
                 s_churn: NonNegative = 0.0, s_tmin: NonNegative = 0.0, s_tmax: NonNegative = math.inf,
                 s_noise: NonNegative = 1.0) -> torch.Tensor:
    """EDM Alg. 2 with the Euler step only (lines 7-8): first order, N = len(sigmas) - 1 evaluations."""
    return _alg2(D, x, sigmas, generator, callback, (s_churn, s_tmin, s_tmax, s_noise), heun=False)


@torch.no_grad()
def sample_heun(D: SigmaDenoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None, callback=None,
                s_churn: NonNegative = 0.0, s_tmin: NonNegative = 0.0, s_tmax: NonNegative = math.inf,
                s_noise: NonNegative = 1.0) -> torch.Tensor:
    """EDM Alg. 2 in full: Euler predictor plus the trapezoidal (Heun) correction, second order;
    the last step to σ = 0 stays Euler (line 9). 2N - 1 evaluations for N steps ending at 0."""
    return _alg2(D, x, sigmas, generator, callback, (s_churn, s_tmin, s_tmax, s_noise), heun=True)


@torch.no_grad()
def sample_dpmpp_2m(
    D: SigmaDenoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
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
