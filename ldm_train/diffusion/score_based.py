"""Score-based formulations on the same U-Net and training loop: the SDEs of Song et al. 2021
(VP, sub-VP, VE) and NCSN (Song & Ermon 2019, 2020).

The network is an ε-parameterised score model: it returns ε̂(x, τ) and
s_θ(x, t) = -ε̂ / std(t), where std(t) is the perturbation kernel's standard deviation (σ_i for
NCSN). Denoising score matching with λ(t) = std(t)² (Song et al. 2021 eq. 7; NCSN eq. 6) is then
the ε-MSE. The U-Net's sinusoidal time input τ is 999·t for the SDEs (t ∈ [ε, 1], as the
paper's DDPM++ code feeds VP models) and 999·i/(L-1) for NCSN noise level i of L.

Code name      -> symbol
``sde``        -> the forward SDE dx = f(x, t) dt + g(t) dw (eq. 5)
``std``        -> sqrt of the marginal variance of p_0t(x_t | x_0)
``sigmas``     -> NCSN's geometric noise levels σ_1 > ... > σ_L
``objective``  -> ``dsm`` (denoising), ``ssm`` / ``ssm_vr`` (sliced score matching, Song et al. 2019)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm_train.config import DiffusionConfig, EvalConfig
from ldm_train.diffusion.denoisers import cfg_model
from ldm_train.diffusion.langevin import annealed_langevin_sample
from ldm_train.diffusion.losses import drop_context
from ldm_train.diffusion.score_losses import geometric_sigmas, sliced_score_matching_loss
from ldm_train.diffusion.sde import SubVPSDE, VESDE, VPSDE, pc_sample, probability_flow_sample

SDE_FORMULATIONS = ("vp_sde", "subvp_sde", "ve_sde")
SDE_SAMPLERS = ("pf_ode", "pc")
TIME_SCALE = 999.0


def build_sde(cfg: DiffusionConfig):
    if cfg.formulation == "vp_sde":
        return VPSDE(cfg.sde_beta_min, cfg.sde_beta_max)
    if cfg.formulation == "subvp_sde":
        return SubVPSDE(cfg.sde_beta_min, cfg.sde_beta_max)
    if cfg.formulation == "ve_sde":
        return VESDE(cfg.sigma_min, cfg.sigma_max)
    raise ValueError(f"diffusion.formulation={cfg.formulation!r} is not an SDE")


def ncsn_sigmas(cfg: DiffusionConfig) -> torch.Tensor:
    return geometric_sigmas(cfg.sigma_min, cfg.sigma_max, cfg.num_scales)


def check_formulation(cfg: DiffusionConfig, sampler: str) -> None:
    """Score-based formulations use an ε-parameterised score net and their own samplers."""
    if cfg.formulation == "ddpm":
        if sampler in SDE_SAMPLERS + ("annealed_langevin",):
            raise ValueError(f"eval.sampler={sampler!r} needs a score-based diffusion.formulation (an SDE or ncsn)")
        return
    if cfg.prediction_type != "epsilon":
        raise ValueError(f"diffusion.formulation={cfg.formulation!r} trains an ε-parameterised score "
                         f"(s = -ε̂/std); v or x0 prediction is not defined for it: set diffusion.prediction_type=epsilon")
    if cfg.learned_variance:
        raise ValueError("diffusion.learned_variance is Improved DDPM's; it needs diffusion.formulation=ddpm")
    wanted = ("annealed_langevin",) if cfg.formulation == "ncsn" else SDE_SAMPLERS
    if sampler not in wanted:
        raise ValueError(f"diffusion.formulation={cfg.formulation!r} samples with eval.sampler in {wanted}, not {sampler!r}")


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), target.float())


def sde_loss(denoiser, x0, context, null_context, sde, cfg: DiffusionConfig, generator=None):
    """t ~ U(ε, 1), x_t ~ p_0t(x_t | x_0); DSM (ε-MSE) or SSM(-VR) weighted by std(t)²."""
    B, device = x0.shape[0], x0.device
    t = cfg.t_eps + (1 - cfg.t_eps) * torch.rand(B, generator=generator, device=device)
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    drop = torch.rand(B, generator=generator, device=device) < cfg.cond_drop_prob
    ctx = drop_context(context, null_context, drop)
    mean_coef, std = sde.marginal(t)
    view = (-1,) + (1,) * (x0.dim() - 1)
    mean_coef, std = mean_coef.to(x0.dtype).view(view), std.to(x0.dtype).view(view)
    x_t = mean_coef * x0 + std * eps
    tau = TIME_SCALE * t
    if cfg.objective == "dsm":
        loss = _mse(denoiser(x_t, tau, ctx), eps)
    else:
        loss = _ssm(denoiser, x_t, tau, ctx, std, cfg, generator)
    return loss, {"loss": loss.detach(), "t_mean": t.mean(), "cond_drop_frac": drop.float().mean()}


def ncsn_loss(denoiser, x0, context, null_context, sigmas, cfg: DiffusionConfig, generator=None):
    """i ~ U{0..L-1}, x̃ = x + σ_i z (NCSN eq. 5); DSM (ε-MSE) or SSM(-VR) weighted by σ_i²."""
    B, device = x0.shape[0], x0.device
    L = sigmas.shape[0]
    idx = torch.randint(0, L, (B,), generator=generator, device=device)
    z = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    drop = torch.rand(B, generator=generator, device=device) < cfg.cond_drop_prob
    ctx = drop_context(context, null_context, drop)
    sigma = sigmas.to(device=device, dtype=x0.dtype)[idx].view((-1,) + (1,) * (x0.dim() - 1))
    tau = TIME_SCALE * idx.float() / max(1, L - 1)
    x_noisy = x0 + sigma * z
    if cfg.objective == "dsm":
        loss = _mse(denoiser(x_noisy, tau, ctx), z)
    else:
        loss = _ssm(denoiser, x_noisy, tau, ctx, sigma, cfg, generator)
    return loss, {"loss": loss.detach(), "t_mean": tau.mean(), "cond_drop_frac": drop.float().mean()}


def _ssm(denoiser, x, tau, ctx, std, cfg: DiffusionConfig, generator):
    """Sliced score matching of s = -ε̂/std on the perturbed data, weighted by std² (per element)."""
    n = cfg.n_projections
    rep = (n,) + (1,) * (ctx.dim() - 1)

    def score(xr):
        return -denoiser(xr, tau.repeat(n), ctx.repeat(*rep)) / std.repeat(n, *([1] * (x.dim() - 1)))

    weight = std.pow(2).mean()
    # SSM differentiates the score w.r.t. x inside the loss (double backward), which only the
    # math attention kernel implements.
    with sdpa_kernel(SDPBackend.MATH):
        ssm = sliced_score_matching_loss(score, x, n, cfg.objective == "ssm_vr", generator)
    return weight * ssm / x[0].numel()


def sample_score_based(denoiser, noise, context, null_context, eval_cfg: EvalConfig, cfg: DiffusionConfig, generator=None):
    """x_0 latents from an ε-parameterised score net with classifier-free guidance (in ε space)."""
    model = cfg_model(denoiser, context, null_context, eval_cfg.guidance_scale)
    if cfg.formulation == "ncsn":
        sigmas = ncsn_sigmas(cfg)
        L = sigmas.shape[0]
        level = {float(s): i for i, s in enumerate(sigmas.tolist())}

        def score_sigma(x, sigma: float):
            tau = torch.full((x.shape[0],), TIME_SCALE * level[float(sigma)] / max(1, L - 1), device=x.device)
            return -model(x, tau) / sigma

        return annealed_langevin_sample(
            score_sigma, sigmas.tolist(), noise * float(sigmas[0]), eval_cfg.langevin_steps_per_sigma,
            eval_cfg.langevin_step_lr, generator,
        )
    sde = build_sde(cfg)

    def score(x, t):
        _, std = sde.marginal(t)
        return -model(x, TIME_SCALE * t) / std.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))

    x_T = noise * sde.marginal(torch.ones(1))[1].item()  # the prior N(0, std(1)^2 I)
    if eval_cfg.sampler == "pf_ode":
        return probability_flow_sample(score, sde, x_T, eval_cfg.steps, method="heun", eps=cfg.t_eps, final_denoise=True)
    corrector = None if eval_cfg.pc_corrector == "none" else eval_cfg.pc_corrector
    return pc_sample(
        score, sde, x_T, eval_cfg.steps, predictor=eval_cfg.pc_predictor, corrector=corrector, snr=eval_cfg.snr,
        n_corrector=eval_cfg.n_corrector, generator=generator, eps=cfg.t_eps,
    )


def build_score_objective(cfg: DiffusionConfig) -> Callable:
    if cfg.formulation == "ncsn":
        sigmas = ncsn_sigmas(cfg)
        return lambda d, x0, c, n, schedule, g: ncsn_loss(d, x0, c, n, sigmas, cfg, g)
    sde = build_sde(cfg)
    return lambda d, x0, c, n, schedule, g: sde_loss(d, x0, c, n, sde, cfg, g)
