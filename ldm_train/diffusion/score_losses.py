"""Score-matching objectives for a score network s_θ(x) ≈ ∇_x log p(x).

Papers: NCSN (Song & Ermon 2019, "Generative modeling by estimating gradients of the data
distribution"), NCSNv2 (Song & Ermon 2020, "Improved techniques for training score-based generative
models"), sliced score matching (Song, Garg, Shi, Ermon 2019, "Sliced score matching").

Code name       -> paper symbol
``sigmas``      -> {σ_i}_{i=1}^L, a descending geometric sequence (NCSN sec. 4.1)
``score_fn``    -> s_θ(x̃, σ) for DSM (noise conditional), s_θ(x) for sliced score matching
``dsm_loss``    -> (1/L) Σ_i λ(σ_i) ℓ(θ; σ_i), ℓ(θ; σ) = ½ E ‖s_θ(x̃, σ) + (x̃ - x)/σ²‖²,
                   λ(σ) = σ² (NCSN eq. 5-6); x̃ = x + σ z, so σ² ℓ = ½ ‖σ s_θ + z‖²
``v``           -> random projection directions v ~ N(0, I) (or Rademacher), M = ``n_projections``
``sliced_score_matching_loss`` -> J = E_v E_x [vᵀ ∇_x(vᵀ s_θ(x)) + ½ (vᵀ s_θ(x))²] (SSM eq. 8), or
                   the variance-reduced SSM-VR: E[vᵀ ∇_x(vᵀ s_θ(x)) + ½ ‖s_θ(x)‖²] (SSM sec. 3.3,
                   E_v[(vᵀs)²] = ‖s‖² taken analytically; the first term is Hutchinson's trace estimator
                   of tr(∇_x s_θ))
``max_pairwise_distance`` -> σ_1 ≈ max_{i,j} ‖x_i - x_j‖ (NCSNv2 Technique 1)
``num_noise_scales``      -> L such that γ = σ_{i-1}/σ_i satisfies
                   Φ(sqrt(2D)(γ-1) + 3γ) - Φ(sqrt(2D)(γ-1) - 3γ) ≈ 0.5 (NCSNv2 Technique 2)
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch


def geometric_sigmas(
    sigma_min: float, sigma_max: float, n: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """σ_1 = sigma_max > ... > σ_n = sigma_min, geometric (constant ratio σ_{i-1}/σ_i), ``[n]``."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if n < 2:
        raise ValueError(f"need n >= 2 noise levels, got {n}")
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)).to(dtype)


def max_pairwise_distance(x: torch.Tensor) -> float:
    """max_{i,j} ‖x_i - x_j‖₂ over the batch (flattened), NCSNv2 Technique 1's choice of σ_1."""
    flat = x.detach().flatten(1).double()
    return float(torch.cdist(flat, flat).max())


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def num_noise_scales(sigma_min: float, sigma_max: float, dim: int, target: float = 0.5) -> int:
    """L for :func:`geometric_sigmas` by NCSNv2 Technique 2: the ratio γ > 1 solving
    Φ(sqrt(2D)(γ-1) + 3γ) - Φ(sqrt(2D)(γ-1) - 3γ) = ``target`` (bisection), then
    L = ⌈log(σ_max/σ_min)/log γ⌉ + 1."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    c = math.sqrt(2.0 * dim)

    def overlap(g: float) -> float:  # decreasing in γ for γ >= 1
        return _phi(c * (g - 1) + 3 * g) - _phi(c * (g - 1) - 3 * g)

    lo, hi = 1.0, 2.0
    while overlap(hi) > target:
        hi *= 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if overlap(mid) > target else (lo, mid)
    gamma = 0.5 * (lo + hi)
    return max(2, math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma)) + 1)


def dsm_loss(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoising score matching over noise levels (NCSN eq. 5-6, λ(σ) = σ²), a scalar.

    Per sample: i ~ U{1..L}, z ~ N(0, I), x̃ = x + σ_i z; loss ½ ‖σ_i s_θ(x̃, σ_i) + z‖² summed over
    dimensions and averaged over the batch (= λ(σ) ½ ‖s_θ + (x̃ - x)/σ²‖²). ``score_fn(x̃, σ)`` gets
    σ as ``[B]``. Draws i then z from ``generator``."""
    B = x.shape[0]
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    idx = torch.randint(0, sigmas.shape[0], (B,), generator=generator, device=x.device)
    sigma = sigmas[idx]
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    s = sigma.view(-1, *([1] * (x.dim() - 1)))
    x_noisy = x + s * z
    score = score_fn(x_noisy, sigma)
    return 0.5 * (s * score + z).pow(2).flatten(1).sum(1).mean()


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
