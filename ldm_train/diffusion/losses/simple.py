"""The denoising training objective (DDPM eq. 14, "L_simple") with classifier-free guidance dropout.

Code name        -> paper symbol
``x0``           -> x_0, clean latents                      (DDPM)
``eps``          -> ε ~ N(0, I)                             (DDPM eq. 14)
``x_t``          -> sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε          (DDPM eq. 4)
``v``            -> sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0          (Salimans & Ho 2022)
``context``      -> c, the text conditioning (cross-attention keys/values)
``null_context`` -> ∅, the "null" token sequence used for unconditional training (Ho & Salimans 2022)
``cond_drop_prob`` -> p_uncond (Ho & Salimans 2022, Algorithm 1)
``snr``          -> SNR(t) = ᾱ_t / (1 - ᾱ_t);  ``sigma`` -> σ_t = SNR(t)^{-1/2} (EDM's noise level)
``weighting``    -> per-sample w(t) on the target MSE:
                    "uniform": 1 (DDPM's L_simple);
                    "min_snr": Min-SNR-γ (Hang et al. 2023, eq. 8-10): min(SNR, γ)/SNR for ε,
                               min(SNR, γ)/(SNR + 1) for v, min(SNR, γ) for x_0; γ = ``min_snr_gamma``;
                    "edm":     λ(σ) = (σ² + σ_data²) / (σ σ_data)² (Karras et al. 2022, Table 1) on the
                               x_0 error, re-expressed on our target (‖x̂_0 - x_0‖² = σ² ‖ε̂ - ε‖² =
                               σ²/(1+σ²) ‖v̂ - v‖²), σ_data = ``sigma_data``
``offset_noise`` -> s in ε ← ε + s·n, n ~ N(0, 1) per (sample, channel) (Guttenberg 2023)
``timestep_sampling`` -> t ~ U{0..T-1}, or "logit_normal": t = ⌊T·sigmoid(u)⌋, u ~ N(m, s²)
                    (Esser et al. 2024, SD3 sec. 3.1; m = ``logit_mean``, s = ``logit_std``)
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ldm_train.diffusion.guidance import Net as Denoiser
from ldm_train.diffusion.guidance import drop_context
from ldm_train.diffusion.losses.vlb import vlb_term
from ldm_train.diffusion.parameterization import PredictionType, check_prediction, target
from ldm_train.diffusion.schedule import NoiseSchedule
Weighting = Literal["uniform", "min_snr", "edm"]
TimestepSampling = Literal["uniform", "logit_normal"]
WEIGHTINGS = ("uniform", "min_snr", "edm")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def loss_weight(
    schedule: NoiseSchedule,
    t: torch.Tensor,
    prediction_type: PredictionType,
    weighting: Weighting = "uniform",
    min_snr_gamma: float = 5.0,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """Per-sample weight w(t) (float64 ``[B]``) of the target MSE; see the module docstring.

    Written in ᾱ = ᾱ_t (SNR = ᾱ/(1-ᾱ), σ² = (1-ᾱ)/ᾱ) so that v and x_0 stay finite at zero SNR:
    EDM for ε: 1 + σ²/σ_d²;  for v: (1 - ᾱ + σ_d² ᾱ)/σ_d²;  for x_0: 1/σ_d² + ᾱ/(1-ᾱ)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    a = schedule.alphas_cumprod.to(t.device)[t]
    if weighting == "uniform":
        return torch.ones_like(a)
    if weighting == "min_snr":
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        snr = a / (1 - a)
        clipped = snr.clamp(max=min_snr_gamma)  # min(SNR, γ), Hang et al. eq. 8
        if prediction_type == "epsilon":
            return clipped / snr  # eq. 9 (x_0 loss = SNR · ε loss)
        if prediction_type == "v_prediction":
            return clipped / (snr + 1)  # eq. 10 (x_0 loss = SNR/(SNR+1) · v loss)
        return clipped
    if sigma_data <= 0:
        raise ValueError(f"sigma_data must be positive, got {sigma_data}")
    sd2 = sigma_data**2
    # EDM Table 1: λ(σ) = (σ² + σ_d²)/(σ σ_d)²; times the x_0-error / target-error factor
    if prediction_type == "epsilon":
        return 1 + (1 - a) / (a * sd2)  # λ σ²
    if prediction_type == "v_prediction":
        return (1 - a + sd2 * a) / sd2  # λ σ²/(1+σ²)
    return 1 / sd2 + a / (1 - a)  # λ


def sample_timesteps(
    batch: int,
    num_train_timesteps: int,
    generator: torch.Generator | None,
    device: torch.device | str,
    timestep_sampling: TimestepSampling = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """int64 ``[batch]`` training timesteps: U{0..T-1}, or logit-normal (SD3 sec. 3.1, eq. 19):
    u ~ N(m, s²), t = min(⌊T·sigmoid(u)⌋, T-1). Each draws one tensor from ``generator``."""
    T = num_train_timesteps
    if timestep_sampling == "uniform":
        return torch.randint(0, T, (batch,), generator=generator, device=device)
    if timestep_sampling == "logit_normal":
        if logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {logit_std}")
        u = torch.randn(batch, generator=generator, device=device, dtype=torch.float64) * logit_std + logit_mean
        return (torch.sigmoid(u) * T).floor().clamp(0, T - 1).to(torch.int64)
    raise ValueError(f"unknown timestep_sampling {timestep_sampling!r}; expected one of {TIMESTEP_SAMPLINGS}")


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
    *,
    weighting: Weighting = "uniform",
    min_snr_gamma: float = 5.0,
    sigma_data: float = 0.5,
    offset_noise: float = 0.0,
    timestep_sampling: TimestepSampling = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    vlb_weight: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Monte-Carlo estimate of E_{t, ε} w(t) || target - denoiser(x_t, t, c) ||^2 (DDPM eq. 14).

    t ~ U{0..T-1}, ε ~ N(0, I) and the per-sample context-drop mask (Ho & Salimans Alg. 1) are
    all drawn from ``generator`` in that order, so a seeded generator reproduces the loss exactly.
    ``generator`` must live on ``x0``'s device. The target is ε or v (``prediction_type``); the MSE
    is computed in float32 and averaged over every element.

    Returns ``(loss, stats)``; ``stats`` holds detached 0-dim tensors (no host sync here):
    ``loss``, ``t_mean`` and ``cond_drop_frac``.

    Keyword options (defaults reproduce the plain loss bit for bit, same generator draws):
    ``weighting``/``min_snr_gamma``/``sigma_data`` (:func:`loss_weight`; non-uniform weights the
    per-sample MSE, then averages over the batch), ``offset_noise`` (adds s·N(0,1) of shape
    [B, C, 1, ...] to ε, drawn after the drop mask), ``timestep_sampling``/``logit_mean``/``logit_std``
    (:func:`sample_timesteps`). The target is ε, v or x_0 ("sample").

    ``vlb_weight`` = λ (Improved DDPM's learned variance, :func:`hybrid_loss`): ``denoiser`` returns
    2C channels [mean output, v_var]; the loss above is L_simple of the mean channels, plus
    λ L_vlb with L_vlb = T · L_t (bits/dim; :func:`..vlb.vlb_term`), the one-term uniform-t estimate
    of Σ_t L_t, on the detached mean so it only trains the variance (sec. 3.1); ``stats`` then
    also hold ``loss_simple`` and ``loss_vlb``. With T = 1000, λ = 0.001 this is ADM's
    RESCALED_MSE hybrid (vb · T/1000).
    """
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
    if offset_noise < 0:
        raise ValueError(f"offset_noise must be >= 0, got {offset_noise}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if vlb_weight is not None:
        check_prediction(prediction_type, schedule)  # L_vlb needs x̂_0: ε is ill-posed at zero terminal SNR
    _check_generator(generator, x0)
    B, C, device = x0.shape[0], x0.shape[1], x0.device
    t = sample_timesteps(B, schedule.num_train_timesteps, generator, device, timestep_sampling,
                         logit_mean, logit_std)
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    drop = torch.rand(B, generator=generator, device=device) < cond_drop_prob  # p=1 -> always, p=0 -> never
    if offset_noise > 0:  # Guttenberg 2023: a per-(sample, channel) constant shifts the mean of ε
        shape = (B, x0.shape[1]) + (1,) * (x0.dim() - 2)
        eps = eps + offset_noise * torch.randn(shape, generator=generator, device=device, dtype=x0.dtype)
    x_t = schedule.add_noise(x0, eps, t)  # DDPM eq. 4
    out = denoiser(x_t, t, drop_context(context, null_context, drop))
    if vlb_weight is not None and out.shape[1] != 2 * C:
        raise ValueError(f"learned variance needs 2*C = {2 * C} output channels, got {out.shape[1]}")
    out, var_out = (out[:, :C], out[:, C:]) if vlb_weight is not None else (out, None)
    target_ = target(schedule, x0, eps, t, prediction_type)
    if weighting == "uniform":
        loss = F.mse_loss(out.float(), target_.float())
    else:
        per_sample = (out.float() - target_.float()).pow(2).flatten(1).mean(1)
        w = loss_weight(schedule, t, prediction_type, weighting, min_snr_gamma, sigma_data)
        loss = (w.to(per_sample.dtype) * per_sample).mean()
    stats = {"t_mean": t.float().mean(), "cond_drop_frac": drop.float().mean()}
    if var_out is not None:  # stop-gradient on μ_θ: L_vlb only moves Σ_θ (Improved DDPM sec. 3.1)
        vb = vlb_term(schedule, x0.float(), x_t.float(), t, out.detach().float(), var_out.float(), prediction_type)
        loss_vlb = vb.mean() * schedule.num_train_timesteps
        stats.update(loss_simple=loss.detach(), loss_vlb=loss_vlb.detach())
        loss = loss + vlb_weight * loss_vlb
    return loss, {"loss": loss.detach(), **stats}


def hybrid_loss(*args, vlb_weight: float = 0.001, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_hybrid = L_simple + λ L_vlb (Improved DDPM eq. 16), λ = ``vlb_weight``: :func:`diffusion_loss`
    with the learned-variance term (same arguments, same generator draws)."""
    return diffusion_loss(*args, vlb_weight=vlb_weight, **kwargs)
