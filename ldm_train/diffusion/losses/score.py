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
``v``          -> random projection directions v ~ N(0, I) (or Rademacher), M = ``n_projections``;
                  SSM: J = E_v E_x [vᵀ ∇_x(vᵀ s_θ(x)) + ½ (vᵀ s_θ(x))²] (eq. 8), SSM-VR replaces the
                  last term by its expectation ½ ‖s_θ(x)‖² (sec. 3.3); the first is Hutchinson's
                  trace estimator of tr(∇_x s_θ)
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm_train.config import DiffusionConfig
from ldm_train.diffusion.guidance import drop_context
from ldm_train.diffusion.parameterization import TIME_SCALE
from ldm_train.diffusion.sdes import build_sde, ncsn_sigmas


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), target.float())


def sde_loss(denoiser, x0, context, null_context, sde, cfg: DiffusionConfig, generator=None):
    """t ~ U(ε, 1), x_t ~ p_0t(x_t | x_0); DSM (ε-MSE) or SSM(-VR) weighted by std(t)²."""
    B, device = x0.shape[0], x0.device
    t = cfg.sde.t_eps + (1 - cfg.sde.t_eps) * torch.rand(B, generator=generator, device=device)
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    drop = torch.rand(B, generator=generator, device=device) < cfg.cond_drop_prob
    ctx = drop_context(context, null_context, drop)
    mean_coef, std = sde.marginal(t)
    view = (-1,) + (1,) * (x0.dim() - 1)
    mean_coef, std = mean_coef.to(x0.dtype).view(view), std.to(x0.dtype).view(view)
    x_t = mean_coef * x0 + std * eps
    tau = TIME_SCALE * t
    if cfg.score_matching.objective == "dsm":
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
    if cfg.score_matching.objective == "dsm":
        loss = _mse(denoiser(x_noisy, tau, ctx), z)
    else:
        loss = _ssm(denoiser, x_noisy, tau, ctx, sigma, cfg, generator)
    return loss, {"loss": loss.detach(), "t_mean": tau.mean(), "cond_drop_frac": drop.float().mean()}


def _ssm(denoiser, x, tau, ctx, std, cfg: DiffusionConfig, generator):
    """Sliced score matching of s = -ε̂/std on the perturbed data, weighted by std² (per element)."""
    n = cfg.score_matching.n_projections
    rep = (n,) + (1,) * (ctx.dim() - 1)

    def score(xr):
        return -denoiser(xr, tau.repeat(n), ctx.repeat(*rep)) / std.repeat(n, *([1] * (x.dim() - 1)))

    weight = std.pow(2).mean()
    # SSM differentiates the score w.r.t. x inside the loss (double backward), which only the
    # math attention kernel implements.
    with sdpa_kernel(SDPBackend.MATH):
        ssm = sliced_score_matching_loss(score, x, n, cfg.score_matching.objective == "ssm_vr", generator)
    return weight * ssm / x[0].numel()


def build_score_objective(cfg: DiffusionConfig) -> Callable:
    """The training objective of a score-based formulation (an SDE, or NCSN)."""
    if cfg.formulation == "ncsn":
        sigmas = ncsn_sigmas(cfg)
        return lambda d, x0, c, n, schedule, g: ncsn_loss(d, x0, c, n, sigmas, cfg, g)
    sde = build_sde(cfg)
    return lambda d, x0, c, n, schedule, g: sde_loss(d, x0, c, n, sde, cfg, g)


def sliced_score_matching_loss(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    n_projections: int = 1,
    variance_reduced: bool = True,
    generator: torch.Generator | None = None,
    projection: Literal["gaussian", "rademacher"] = "gaussian",
) -> torch.Tensor:
    """Sliced score matching (Song et al. 2019), a scalar estimate of J(θ) up to a constant.

    Each sample is repeated ``n_projections`` times with its own v. The Jacobian term vᵀ ∇_x(vᵀ s)
    uses ``torch.autograd.grad`` with ``create_graph=True`` so the loss is differentiable in θ.
    ``variance_reduced`` replaces ½ (vᵀ s)² (eq. 8) by its expectation ½ ‖s‖² (SSM-VR)."""
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    xr = x.detach().repeat(n_projections, *([1] * (x.dim() - 1))).requires_grad_(True)
    v = torch.randn(xr.shape, generator=generator, device=x.device, dtype=x.dtype)
    if projection == "rademacher":
        v = v.sign()
    elif projection != "gaussian":
        raise ValueError(f"unknown projection {projection!r}; expected gaussian or rademacher")
    score = score_fn(xr)
    sv = (score * v).flatten(1).sum(1)  # vᵀ s_θ(x)
    (grad,) = torch.autograd.grad(sv.sum(), xr, create_graph=True)  # ∇_x (vᵀ s_θ(x))
    jac_term = (v * grad).flatten(1).sum(1)  # vᵀ ∇_x s_θ(x) v
    if variance_reduced:
        sq_term = 0.5 * score.pow(2).flatten(1).sum(1)  # SSM-VR: ½ ‖s_θ(x)‖²
    else:
        sq_term = 0.5 * sv.pow(2)  # eq. 8: ½ (vᵀ s_θ(x))²
    return (jac_term + sq_term).mean()
