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
``hybrid_loss``          -> L_hybrid = L_simple + λ L_vlb, λ = 0.001 (Improved DDPM eq. 16), with
                            stop-gradient on μ_θ inside L_vlb (sec. 3.1)

Time indices follow :mod:`schedule`: 0-based t, so the code's t = 0 is the paper's t = 1 (L_0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ldm_train.diffusion.guidance import drop_context
from ldm_train.diffusion.losses.simple import Denoiser, _check_generator
from ldm_train.diffusion.parameterization import PredictionType, check_prediction, predict, target
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


def hybrid_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor,
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    cond_drop_prob: float,
    generator: torch.Generator | None = None,
    *,
    vlb_weight: float = 0.001,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_hybrid = L_simple + λ L_vlb (Improved DDPM eq. 16), λ = ``vlb_weight``.

    ``denoiser`` returns 2C channels: [mean_out (ε, v or x_0), v]. Draws t, ε, drop mask from
    ``generator`` in the same order as :func:`diffusion_loss`. L_simple is the MSE of mean_out on
    its target; L_vlb = T · L_t(bits/dim) is the one-term uniform-t estimate of Σ_t L_t, computed
    with mean_out detached so it only trains the variance (sec. 3.1). With T = 1000, λ = 0.001
    this equals ADM's RESCALED_MSE hybrid (vb · T/1000).

    Returns ``(loss, stats)`` with ``loss``, ``loss_simple``, ``loss_vlb``, ``t_mean``, ``cond_drop_frac``."""
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
    check_prediction(prediction_type, schedule)  # L_vlb needs x̂_0: ε is ill-posed at zero terminal SNR
    _check_generator(generator, x0)
    B, C, device = x0.shape[0], x0.shape[1], x0.device
    T = schedule.num_train_timesteps
    t = torch.randint(0, T, (B,), generator=generator, device=device)
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    drop = torch.rand(B, generator=generator, device=device) < cond_drop_prob
    x_t = schedule.add_noise(x0, eps, t)  # DDPM eq. 4
    out = denoiser(x_t, t, drop_context(context, null_context, drop))
    if out.shape[1] != 2 * C:
        raise ValueError(f"learned variance needs 2*C = {2 * C} output channels, got {out.shape[1]}")
    mean_out, var_out = out[:, :C], out[:, C:]
    loss_simple = F.mse_loss(mean_out.float(), target(schedule, x0, eps, t, prediction_type).float())
    # stop-gradient on μ_θ: L_vlb only moves Σ_θ (Improved DDPM sec. 3.1)
    vb = vlb_term(schedule, x0.float(), x_t.float(), t, mean_out.detach().float(), var_out.float(), prediction_type)
    loss_vlb = vb.mean() * T
    loss = loss_simple + vlb_weight * loss_vlb
    stats = {
        "loss": loss.detach(),
        "loss_simple": loss_simple.detach(),
        "loss_vlb": loss_vlb.detach(),
        "t_mean": t.float().mean(),
        "cond_drop_frac": drop.float().mean(),
    }
    return loss, stats
