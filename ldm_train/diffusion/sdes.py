"""Score-based generative modelling through SDEs (Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole 2021).

Forward SDEs on t ∈ [0, 1], their reverse-time SDE and probability-flow ODE, as pure functions of a
score callable ``score(x, t) -> ∇_x log p_t(x)`` (``t`` a float tensor ``[B]``); the samplers that
integrate them are in :mod:`ldm_train.diffusion.samplers.sde`. Also NCSN's noise levels.

Code name            -> paper symbol
``sde(x, t)``        -> (f(x, t), g(t)): dx = f dt + g dw                           (eq. 5)
``marginal(t)``      -> (mean coefficient, std) of p_{0t}(x(t) | x(0))              (eq. 29, 33; App. B)
``beta_min/max``     -> β̄_min, β̄_max; β(t) = β̄_min + t (β̄_max - β̄_min)           (App. C, eq. 32)
``sigma_min/max``    -> σ_min, σ_max; σ(t) = σ_min (σ_max/σ_min)^t                  (App. C, eq. 30)
``reverse_drift``    -> f - g² ∇ log p_t (reverse SDE, eq. 6)
``ode_drift``        -> f - ½ g² ∇ log p_t (probability-flow ODE, eq. 13)
``eps``              -> ε, the smallest time integrated to (1e-3 VP/sub-VP, 1e-5 VE; App. C)
``sigmas`` (NCSN)    -> {σ_i}_{i=1}^L, a descending geometric sequence (Song & Ermon 2019 sec. 4.2)

Convention for the VE SDE (as in the paper's code): p_0 is the data perturbed by N(0, σ_min² I), so
the marginal std is σ(t) itself and the prior is N(0, σ_max² I). The optional final step returns
Tweedie's E[x(0) | x(ε)] = (x + std² ∇ log p_ε(x)) / mean_coef (Efron 2011; the paper's
"denoising" trick, App. G), which removes that residual noise.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ldm_train.config import DiffusionConfig

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _as_t(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample ``[B]`` (or scalar) float64 coefficient, broadcastable to ``x`` in its dtype."""
    v = torch.as_tensor(v, dtype=torch.float64)
    if v.numel() > 1:
        v = v.view(-1, *([1] * (x.dim() - 1)))
    else:
        v = v.reshape(())
    return v.to(device=x.device, dtype=x.dtype)


class _SDE:
    T: float = 1.0
    eps: float = 1e-3

    def marginal(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sde(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        """The equivalent VE noise level std(t) / mean_coef(t) (EDM's σ(t))."""
        m, s = self.marginal(t)
        return s / m

    def prior_sample(self, shape, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """x(T) ~ p_T, the prior N(0, std(T)² I)."""
        _, s = self.marginal(self.T)
        return float(s) * torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def discretize(self, x: torch.Tensor, t, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_i, G_i) of the discrete forward chain x_{i+1} = x_i + f_i + G_i z over a step ``dt`` > 0
        ending at ``t`` (Euler-Maruyama by default: f dt, g sqrt(dt); App. E)."""
        f, g = self.sde(x, t)
        return f * dt, g * math.sqrt(dt)

    def corrector_alpha(self, t: float, dt: float) -> float:
        """α_i in the Langevin corrector's step size (Alg. 4-5): 1 except for the VP SDE."""
        return 1.0


class VPSDE(_SDE):
    """Variance preserving: dx = -½ β(t) x dt + sqrt(β(t)) dw (eq. 11), the continuous DDPM."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t) -> torch.Tensor:
        return self.beta_min + _as_t(t) * (self.beta_max - self.beta_min)

    def _log_mean_coef(self, t) -> torch.Tensor:
        t = _as_t(t)
        # eq. 33: mean coefficient exp(-¼ t² (β̄_max - β̄_min) - ½ t β̄_min)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def marginal(self, t):
        m = torch.exp(self._log_mean_coef(t))
        return m, torch.sqrt(1 - m**2)  # eq. 33: variance 1 - exp(-½ t² (β̄_max-β̄_min) - t β̄_min)

    def sde(self, x, t):
        beta = self.beta(t)
        return -0.5 * _bcast(beta, x) * x, _bcast(beta.sqrt(), x)  # eq. 11

    def discretize(self, x, t, dt):
        # The DDPM chain (eq. 10 / Alg. 3): 1 - β_i = ᾱ(t)/ᾱ(t - dt),
        # f_i = (sqrt(1 - β_i) - 1) x, G_i = sqrt(β_i)
        t = _as_t(t)
        beta_i = 1 - torch.exp(2 * (self._log_mean_coef(t) - self._log_mean_coef((t - dt).clamp(min=0))))
        return (_bcast((1 - beta_i).sqrt(), x) - 1) * x, _bcast(beta_i.sqrt(), x)

    def corrector_alpha(self, t: float, dt: float) -> float:
        """α_i = 1 - β_i of the DDPM chain (Alg. 5)."""
        log_ratio = self._log_mean_coef(t) - self._log_mean_coef(max(t - dt, 0.0))
        return float(torch.exp(2 * log_ratio))


class SubVPSDE(VPSDE):
    """Sub-VP: dx = -½ β(t) x dt + sqrt(β(t) (1 - exp(-2 ∫_0^t β(s) ds))) dw (eq. 12)."""

    def marginal(self, t):
        m = torch.exp(self._log_mean_coef(t))
        return m, 1 - m**2  # eq. 29 (App. B): std = 1 - exp(-½ t² (β̄_max-β̄_min) - t β̄_min)

    def sde(self, x, t):
        beta = self.beta(t)
        discount = 1 - torch.exp(4 * self._log_mean_coef(t))  # 1 - exp(-2 ∫_0^t β(s) ds)
        return -0.5 * _bcast(beta, x) * x, _bcast((beta * discount).sqrt(), x)  # eq. 12

    def discretize(self, x, t, dt):
        return _SDE.discretize(self, x, t, dt)  # Euler-Maruyama, as in the paper's code

    def corrector_alpha(self, t, dt):
        return 1.0  # the paper's code uses α = 1 for sub-VP


class VESDE(_SDE):
    """Variance exploding: dx = sqrt(d[σ²(t)]/dt) dw (eq. 9), the continuous NCSN (SMLD)."""

    eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, t) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _as_t(t)  # eq. 30

    def marginal(self, t):
        s = self.sigma(t)
        return torch.ones_like(s), s  # mean x(0), std σ(t) (module docstring's convention)

    def sde(self, x, t):
        # g(t) = sqrt(d σ²/dt) = σ(t) sqrt(2 log(σ_max/σ_min)) (eq. 30)
        g = self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        return torch.zeros_like(x), _bcast(g, x)

    def discretize(self, x, t, dt):
        # The SMLD chain (eq. 8 / Alg. 2): x_i = x_{i-1} + sqrt(σ_i² - σ_{i-1}²) z
        t = _as_t(t)
        s, s_prev = self.sigma(t), torch.where(t - dt > 0, self.sigma(t - dt), torch.zeros_like(t))
        return torch.zeros_like(x), _bcast((s**2 - s_prev**2).sqrt(), x)


# -- reverse-time dynamics ------------------------------------------------------------------
def tvec(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), dtype=torch.float64)


def reverse_drift(score: Score, sde: _SDE, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f - g² ∇ log p_t, g) of the reverse SDE dx = [f - g² ∇ log p_t] dt + g dw̄ (eq. 6)."""
    f, g = sde.sde(x, t)
    return f - g**2 * score(x, t), g


def ode_drift(score: Score, sde: _SDE, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx/dt = f - ½ g² ∇ log p_t of the probability-flow ODE (eq. 13)."""
    f, g = sde.sde(x, t)
    return f - 0.5 * g**2 * score(x, t)


def tweedie_denoise(score: Score, sde: _SDE, x: torch.Tensor, t: float) -> torch.Tensor:
    """E[x(0) | x(t)] = (x + std(t)² ∇ log p_t(x)) / mean_coef(t) (Tweedie; Efron 2011)."""
    m, s = sde.marginal(t)
    return (x + float(s) ** 2 * score(x, tvec(t, x))) / float(m)


def time_grid(sde: _SDE, steps: int, eps: float | None = None) -> list[float]:
    """``steps + 1`` uniformly spaced times from T down to ε (the paper's grid, App. C)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    eps = sde.eps if eps is None else eps
    return torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64).tolist()


def geometric_sigmas(sigma_min: float, sigma_max: float, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """σ_1 = sigma_max > ... > σ_n = sigma_min, geometric (constant ratio σ_{i-1}/σ_i), ``[n]``."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if n < 2:
        raise ValueError(f"need n >= 2 noise levels, got {n}")
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)).to(dtype)


def build_sde(cfg: DiffusionConfig) -> _SDE:
    """The forward SDE of ``diffusion.formulation`` (section ``diffusion.sde``)."""
    s = cfg.sde
    sde = {"vp_sde": lambda: VPSDE(s.beta_min, s.beta_max), "subvp_sde": lambda: SubVPSDE(s.beta_min, s.beta_max),
           "ve_sde": lambda: VESDE(s.sigma_min, s.sigma_max)}[cfg.formulation]()
    sde.eps = s.t_eps  # the smallest time trained on and integrated to
    return sde


def ncsn_sigmas(cfg: DiffusionConfig) -> torch.Tensor:
    """NCSN's L = ``diffusion.ncsn.num_scales`` geometric levels (section ``diffusion.ncsn``)."""
    return geometric_sigmas(cfg.ncsn.sigma_min, cfg.ncsn.sigma_max, cfg.ncsn.num_scales)
