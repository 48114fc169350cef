"""An exactly solvable diffusion target: a Gaussian mixture and its closed-form denoiser and score
(test-only code; ``launch/bench_samplers.py`` loads it by path).

Used in place of a trained network to test samplers for exactness (issue 4): with the exact
posterior mean every remaining error is the sampler's.

Papers: Tweedie's formula (Efron 2011; Robbins 1956), DDPM (Ho et al. 2020), EDM (Karras et al.
2022, "ideal denoiser", eq. 57 generalised to full covariances), score SDEs (Song et al. 2021).

Code name        -> symbol
``weights``      -> π_k, mixture weights (sum to 1)
``means``        -> μ_k   [K, D]
``covs``         -> Σ_k   [K, D, D]
``sigma``        -> σ, VE noise level: x = x_0 + σ ε (EDM's σ; NCSN's σ_i)
``denoise``      -> D(x; σ) = E[x_0 | x] (EDM eq. 2's ideal denoiser; Tweedie)
``score``        -> ∇_x log p_σ(x) = (D(x; σ) - x) / σ²  (Tweedie; EDM eq. 3)
``mean_coef``    -> s(t) (EDM) = sqrt(ᾱ_t) (DDPM) = mean coefficient of p_{0t}(x_t | x_0) (Song et al.)
``std``          -> standard deviation of p_{0t}(x_t | x_0)

Closed form. Each component convolved with N(0, σ² I) is N(μ_k, Σ_k + σ² I), so the responsibilities
are r_k(x) ∝ π_k N(x; μ_k, Σ_k + σ² I) and, by Gaussian conditioning within component k,
E[x_0 | x, k] = μ_k + Σ_k (Σ_k + σ² I)^{-1} (x - μ_k); D(x; σ) = Σ_k r_k(x) E[x_0 | x, k].
A scaled marginal x = s x_0 + std·ε is the VE case at σ = std / s evaluated at x / s.
Maths runs in float64; results come back in the input's dtype.

Also the test-only score-matching helpers (NCSN, Song & Ermon 2019; NCSNv2, Song & Ermon 2020):
``dsm_loss``     -> (1/L) Σ_i λ(σ_i) ℓ(θ; σ_i), ℓ(θ; σ) = ½ E ‖s_θ(x̃, σ) + (x̃ - x)/σ²‖²,
                    λ(σ) = σ² (NCSN eq. 5-6); x̃ = x + σ z, so σ² ℓ = ½ ‖σ s_θ + z‖²
``max_pairwise_distance`` -> σ_1 ≈ max_{i,j} ‖x_i - x_j‖ (NCSNv2 Technique 1)
``num_noise_scales``      -> L such that γ = σ_{i-1}/σ_i satisfies
                    Φ(sqrt(2D)(γ-1) + 3γ) - Φ(sqrt(2D)(γ-1) - 3γ) ≈ 0.5 (NCSNv2 Technique 2)
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ldm_train.diffusion.schedule import NoiseSchedule


class GaussianMixture:
    """p(x_0) = Σ_k π_k N(μ_k, Σ_k) in R^D. Inputs ``x`` are ``[N, ...]`` with prod(...) = D."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        cov = torch.as_tensor(covs, dtype=torch.float64)
        K, D = mu.shape
        if w.shape != (K,) or cov.shape != (K, D, D):
            raise ValueError(f"expected weights [K], means [K, D], covs [K, D, D]; got "
                             f"{tuple(w.shape)}, {tuple(mu.shape)}, {tuple(cov.shape)}")
        if (w < 0).any() or abs(float(w.sum()) - 1) > 1e-6:
            raise ValueError("weights must be non-negative and sum to 1")
        self.weights, self.means, self.covs = w / w.sum(), mu, cov
        self.chol = torch.linalg.cholesky(cov)  # raises if some Σ_k is not positive definite
        self.K, self.D = K, D

    # -- data ---------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None,
               return_labels: bool = False):
        """``n`` float64 draws ``[n, D]`` (and their component labels ``[n]`` if asked)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.D, generator=generator, dtype=torch.float64)
        x = self.means[k] + (self.chol[k] @ z.unsqueeze(-1)).squeeze(-1)  # μ_k + L_k z, L_k L_kᵀ = Σ_k
        return (x, k) if return_labels else x

    def log_prob(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """log p_σ(x), the density of x_0 + σ ε, ``[N]`` float64."""
        logp, _, _ = self._posterior(x, sigma)
        return torch.logsumexp(logp, dim=-1)

    def responsibilities(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """r_k(x) = P(k | x_0 + σ ε = x), ``[N, K]`` float64."""
        logp, _, _ = self._posterior(x, sigma)
        return torch.softmax(logp, dim=-1)

    # -- exact denoiser and score -------------------------------------------------------------
    def _posterior(self, x: torch.Tensor, sigma: float | torch.Tensor):
        """(log π_k N(x; μ_k, Σ_k + σ² I) [N, K], E[x_0 | x, k] [N, K, D], x as [N, D] float64)."""
        N = x.shape[0]
        xf = x.reshape(N, -1).to(torch.float64)
        if xf.shape[1] != self.D:
            raise ValueError(f"x has {xf.shape[1]} features per sample, the mixture has D={self.D}")
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        eye = torch.eye(self.D, dtype=torch.float64)
        diff = xf[:, None, :] - self.means[None]  # [N, K, D]
        if s.numel() == 1 or bool((s == s[0]).all()):
            C = self.covs + s[0] ** 2 * eye  # [K, D, D], shared by the batch
            L = torch.linalg.cholesky(C)
            y = torch.linalg.solve_triangular(L[None], diff.unsqueeze(-1), upper=False)  # L⁻¹(x-μ)
            logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)[None]  # [1, K]
            Cinv_diff = torch.cholesky_solve(diff.unsqueeze(-1), L[None])  # C⁻¹(x-μ), [N, K, D, 1]
        else:
            if s.numel() != N:
                raise ValueError(f"sigma must be a scalar or have {N} entries, got {s.numel()}")
            C = self.covs[None] + (s ** 2)[:, None, None, None] * eye  # [N, K, D, D]
            L = torch.linalg.cholesky(C)
            y = torch.linalg.solve_triangular(L, diff.unsqueeze(-1), upper=False)
            logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
            Cinv_diff = torch.cholesky_solve(diff.unsqueeze(-1), L)
        maha = y.squeeze(-1).pow(2).sum(-1)  # (x-μ)ᵀ C⁻¹ (x-μ)
        logp = torch.log(self.weights)[None] - 0.5 * (maha + logdet + self.D * math.log(2 * math.pi))
        cond_mean = self.means[None] + (self.covs[None] @ Cinv_diff).squeeze(-1)  # μ_k + Σ_k C⁻¹(x-μ_k)
        return logp, cond_mean, xf

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """D(x; σ) = E[x_0 | x_0 + σ ε = x] (module docstring), shaped and typed like ``x``.
        ``sigma`` is a float or a tensor with 1 or N entries."""
        logp, cond_mean, _ = self._posterior(x, sigma)
        r = torch.softmax(logp, dim=-1)  # responsibilities under N(μ_k, Σ_k + σ² I)
        return (r.unsqueeze(-1) * cond_mean).sum(1).reshape(x.shape).to(x.dtype)

    def score(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """∇_x log p_σ(x) = (D(x; σ) - x) / σ² (Tweedie), for σ > 0."""
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        s = s.view(-1, *([1] * (x.dim() - 1))) if s.numel() > 1 else s.reshape(())
        d = self.denoise(x, sigma).to(torch.float64)
        return ((d - x.to(torch.float64)) / s**2).to(x.dtype)


# -- adapters -------------------------------------------------------------------------------
def as_discrete_model(gmm: GaussianMixture, schedule: NoiseSchedule, prediction_type: str = "epsilon"
                      ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The Bayes-optimal network ``model(x_t, t, context)`` for a DDPM ``schedule`` (context ignored).

    x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε (DDPM eq. 4) ⇒ x = x_t / sqrt(ᾱ_t) = x_0 + σ ε with
    σ² = (1-ᾱ_t)/ᾱ_t; x̂_0 = D(x; σ); ε̂ = (x_t - sqrt(ᾱ_t) x̂_0)/sqrt(1-ᾱ_t) (DDIM eq. 9 inverted);
    v̂ = sqrt(ᾱ_t) ε̂ - sqrt(1-ᾱ_t) x̂_0 (Salimans & Ho sec. 4). ``prediction_type``: epsilon,
    v_prediction or sample (x̂_0)."""
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")
    table = schedule.alphas_cumprod.to(torch.float64)

    def model(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        a = table[t.cpu().long()].view(-1, *([1] * (x_t.dim() - 1)))
        xt = x_t.to(torch.float64)
        sigma = ((1 - a) / a).sqrt().reshape(-1)
        x0 = gmm.denoise(xt / a.sqrt(), sigma).to(torch.float64)
        if prediction_type == "sample":
            out = x0
        else:
            eps = (xt - a.sqrt() * x0) / (1 - a).sqrt()
            out = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.to(x_t.dtype)

    return model


def as_vp_score(gmm: GaussianMixture, sde) -> Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]:
    """The exact score ``score(x, t) = ∇_x log p_t(x)`` of the marginal of a continuous SDE
    (``VPSDE``, ``SubVPSDE`` or ``VESDE`` from :mod:`ldm_train.diffusion.sdes`; anything with
    ``marginal(t) -> (mean_coef, std)``). With x = m x_0 + s ε (Song et al. 2021, eq. 29/33):
    ∇_x log p_t(x) = (1/m) ∇_y log p_σ(y) at y = x/m, σ = s/m."""

    def score(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        m, s = sde.marginal(t)
        m, s = torch.as_tensor(m, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
        shape = (-1, *([1] * (x.dim() - 1)))
        mb = m.view(shape) if m.numel() > 1 else m.reshape(())
        sig = s / m
        return (gmm.score(x.to(torch.float64) / mb, sig) / mb).to(x.dtype)

    return score


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between two equal-size samples ``[N, D]`` (Rabin et al. 2011;
    Bonneel et al. 2015): mean over random unit directions θ of the 1-D W2 between the sorted
    projections, W2(θ) = sqrt(mean_i (sort(aθ)_i - sort(bθ)_i)²)."""
    a = a.reshape(a.shape[0], -1).to(torch.float64)
    b = b.reshape(b.shape[0], -1).to(torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"samples must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = torch.randn(a.shape[1], n_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, _ = (a @ theta).sort(dim=0)
    pb, _ = (b @ theta).sort(dim=0)
    return float((pa - pb).pow(2).mean(0).sqrt().mean())


# -- score-matching helpers (from the former ldm_train.diffusion.score_losses) ------------------
def max_pairwise_distance(x: torch.Tensor) -> float:
    """max_{i,j} ‖x_i - x_j‖₂ over the batch (flattened), NCSNv2 Technique 1's choice of σ_1."""
    flat = x.detach().flatten(1).double()
    return float(torch.cdist(flat, flat).max())


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def num_noise_scales(sigma_min: float, sigma_max: float, dim: int, target: float = 0.5) -> int:
    """L for :func:`ldm_train.diffusion.sdes.geometric_sigmas` by NCSNv2 Technique 2: the ratio γ > 1 solving
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


class Counter:
    """Wraps a denoiser/score callable and counts its calls (= NFE; no guidance here)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)
