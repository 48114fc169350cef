"""The variational bound L_vlb and Improved DDPM's learned reverse variance (hybrid objective).

Papers: DDPM (Ho et al. 2020, eq. 5-7), Improved DDPM (Nichol & Dhariwal 2021, sec. 3.1, eq. 15-16),
ADM code conventions (Dhariwal & Nichol 2021: bits/dim, discretised decoder, RESCALED_MSE).

Code name                -> paper symbol
``mean_out``             -> the mean parameterisation output of the network (ε, v or x_0)
``var_out``              -> v, the variance output; v' = (v + 1)/2 ∈ [0, 1] for v ∈ [-1, 1]
``model_log_variance``   -> log Σ_θ(x_t, t) = v' log β_t + (1 - v') log β̃_t   (Improved DDPM eq. 15)
``model_mean``           -> μ_θ(x_t, t) = μ̃_t(x_t, x̂_0)                      (DDPM eq. 7 with x̂_0)
``vlb_term``             -> L_{t-1} = D_KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) for t ≥ 1 and
                            L_0 = -log p_θ(x_0|x_1) (discretised Gaussian, DDPM sec. 3.3) at t = 0,
                            both per sample in bits/dim (nats / log 2, averaged over dimensions)
L_hybrid = L_simple + λ L_vlb (Improved DDPM eq. 16) is ``losses.simple.diffusion_loss`` with
``vlb_weight`` = λ (``hybrid_loss``), with stop-gradient on μ_θ inside L_vlb (sec. 3.1)

Time indices follow :mod:`schedule`: 0-based t, so the code's t = 0 is the paper's t = 1 (L_0).
"""
from __future__ import annotations

import math

import torch

from ldm_train.diffusion.parameterization import PredictionType, predict
from ldm_train.diffusion.schedule import NoiseSchedule


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats:
    ½ (-1 + logvar2 - logvar1 + e^{logvar1 - logvar2} + (mean1 - mean2)² e^{-logvar2})."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) ≈ ½ (1 + tanh(sqrt(2/π) (x + 0.044715 x³))) (the approximation ADM uses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(x) elementwise (nats) of data x ∈ [-1, 1] quantised to 256 bins of width 2/255 under
    N(means, e^{2 log_scales}) (DDPM sec. 3.3; ADM's formula): the Gaussian mass of
    [x - 1/255, x + 1/255], with the edge bins extended to ∓∞."""
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def model_log_variance(schedule: NoiseSchedule, var_out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log Σ_θ = v' log β_t + (1 - v') log β̃_t, v' = (v + 1)/2 (Improved DDPM eq. 15).

    ``var_out`` = v (unbounded; v = 1 gives β_t, v = -1 gives β̃_t exactly). log β̃ is ADM's clipped
    table (β̃_0 := β̃_1, since β̃_0 = 0). Computed in ``var_out``'s dtype."""
    frac = (var_out + 1) / 2
    max_log = schedule.log_beta(t, var_out)
    min_log = schedule.posterior_log_variance_clipped(t, var_out)
    return frac * max_log + (1 - frac) * min_log


def p_mean_variance(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    t: torch.Tensor,
    mean_out: torch.Tensor,
    var_out: torch.Tensor,
    prediction_type: PredictionType = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(μ_θ, log Σ_θ, x̂_0) of p_θ(x_{t-1} | x_t): μ_θ = μ̃_t(x_t, x̂_0) (DDPM eq. 7, with x̂_0 from
    ``mean_out``), log Σ_θ from :func:`model_log_variance`. x̂_0 is not clipped (ADM's training path)."""
    x0_hat, _ = predict(schedule, mean_out, x_t, t, prediction_type)
    return schedule.posterior_mean(x0_hat, x_t, t), model_log_variance(schedule, var_out, t), x0_hat


def vlb_term(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    mean_out: torch.Tensor,
    var_out: torch.Tensor,
    prediction_type: PredictionType = "epsilon",
) -> torch.Tensor:
    """Per-sample L_{t-1} in bits/dim, float ``[B]`` (ADM's ``_vb_terms_bpd``).

    t ≥ 1: D_KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) (DDPM eq. 5), q's variance log-clipped like ADM;
    t = 0: the decoder NLL -log p_θ(x_0|x_1), discretised Gaussian (data assumed in [-1, 1]).
    Both averaged over non-batch dimensions and divided by log 2."""
    model_mean, model_logvar, _ = p_mean_variance(schedule, x_t, t, mean_out, var_out, prediction_type)
    true_mean = schedule.posterior_mean(x0, x_t, t)
    true_logvar = schedule.posterior_log_variance_clipped(t, x_t)
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
    nll = nll.flatten(1).mean(1) / math.log(2.0)
    return torch.where(t.to(kl.device) == 0, nll, kl)
