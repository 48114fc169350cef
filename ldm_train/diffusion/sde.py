"""Score-based generative modelling through SDEs (Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole 2021).

Forward SDEs on t ∈ [0, 1], their reverse-time SDE and probability-flow ODE, and samplers that are
pure functions of a score callable ``score(x, t) -> ∇_x log p_t(x)`` (``t`` a float tensor ``[B]``).

Code name            -> paper symbol
``sde(x, t)``        -> (f(x, t), g(t)): dx = f dt + g dw                           (eq. 5)
``marginal(t)``      -> (mean coefficient, std) of p_{0t}(x(t) | x(0))              (eq. 29, 33; App. B)
``beta_min/max``     -> β̄_min, β̄_max; β(t) = β̄_min + t (β̄_max - β̄_min)           (App. C, eq. 32)
``sigma_min/max``    -> σ_min, σ_max; σ(t) = σ_min (σ_max/σ_min)^t                  (App. C, eq. 30)
``reverse_drift``    -> f - g² ∇ log p_t (reverse SDE, eq. 6)
``ode_drift``        -> f - ½ g² ∇ log p_t (probability-flow ODE, eq. 13)
``eps``              -> ε, the smallest time integrated to (1e-3 VP/sub-VP, 1e-5 VE; App. C)
``snr``              -> r, the corrector's signal-to-noise ratio (Alg. 4, 5)
``n_corrector``      -> M, corrector steps per noise level (Alg. 1)

Convention for the VE SDE (as in the paper's code): p_0 is the data perturbed by N(0, σ_min² I), so
the marginal std is σ(t) itself and the prior is N(0, σ_max² I). The optional final step returns
Tweedie's E[x(0) | x(ε)] = (x + std² ∇ log p_ε(x)) / mean_coef (Efron 2011; the paper's
"denoising" trick, App. G), which removes that residual noise.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

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
def _tvec(t: float, x: torch.Tensor) -> torch.Tensor:
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
    return (x + float(s) ** 2 * score(x, _tvec(t, x))) / float(m)


def time_grid(sde: _SDE, steps: int, eps: float | None = None) -> list[float]:
    """``steps + 1`` uniformly spaced times from T down to ε (the paper's grid, App. C)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    eps = sde.eps if eps is None else eps
    return torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64).tolist()


@torch.no_grad()
def probability_flow_sample(
    score: Score, sde: _SDE, x_T: torch.Tensor, steps: int, method: Literal["heun", "euler"] = "heun",
    eps: float | None = None, final_denoise: bool = False,
) -> torch.Tensor:
    """Integrate the probability-flow ODE (eq. 13) from t = T to ε with ``steps`` fixed steps.

    ``euler``: x ← x + h·d(x, t), 1 score call per step (1st order). ``heun``: the explicit
    trapezoidal rule (Heun's 2nd-order method, as in EDM Alg. 1 without churn), 2 calls per step.
    Deterministic; ``final_denoise`` adds one Tweedie step (1 call) at t = ε."""
    if method not in ("heun", "euler"):
        raise ValueError(f"unknown method {method!r}; expected heun or euler")
    ts = time_grid(sde, steps, eps)
    x = x_T
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t  # negative: integrating backwards in time
        d = ode_drift(score, sde, x, _tvec(t, x))
        x_euler = x + h * d
        if method == "euler":
            x = x_euler
        else:
            d_next = ode_drift(score, sde, x_euler, _tvec(t_next, x))
            x = x + h * 0.5 * (d + d_next)  # trapezoidal correction
    if final_denoise:
        x = tweedie_denoise(score, sde, x, ts[-1])
    return x


def langevin_corrector_step(score: Score, sde: _SDE, x: torch.Tensor, t: float, snr: float,
                            alpha: float, generator: torch.Generator | None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One Langevin MCMC step at time t (Alg. 4 VE / Alg. 5 VP): ε = 2 α (r ‖z‖ / ‖s‖)²,
    x ← x + ε s + sqrt(2 ε) z. As in the paper's code the norms are per-sample norms averaged
    over the batch; α = ``sde.corrector_alpha``: 1 - β_i for VP, 1 for sub-VP and VE (as the
    paper's code). Returns (x, its noise-free mean)."""
    s = score(x, _tvec(t, x))
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    grad_norm = s.reshape(s.shape[0], -1).norm(dim=-1).mean()
    noise_norm = z.reshape(z.shape[0], -1).norm(dim=-1).mean()
    step = 2 * alpha * (snr * noise_norm / grad_norm) ** 2
    x_mean = x + step * s
    return x_mean + (2 * step).sqrt() * z, x_mean


@torch.no_grad()
def pc_sample(
    score: Score, sde: _SDE, x_T: torch.Tensor, steps: int,
    predictor: Literal["reverse_diffusion", "euler_maruyama"] = "reverse_diffusion",
    corrector: Literal["langevin"] | None = "langevin", snr: float = 0.16, n_corrector: int = 1,
    generator: torch.Generator | None = None, eps: float | None = None, final_denoise: bool = True,
) -> torch.Tensor:
    """Predictor-corrector sampling (Alg. 1; Alg. 2 for VE, Alg. 3 for VP) from x_T ~ prior.

    Each of ``steps`` levels t_i → t_{i+1} (grid T → ε): one predictor step, then ``n_corrector``
    Langevin steps at t_{i+1}. Predictors: ``reverse_diffusion`` (eq. 46-47: x ← x - f_i + G_i² s +
    G_i z with the forward chain's (f_i, G_i), i.e. ancestral sampling of Alg. 2/3) or
    ``euler_maruyama`` (reverse SDE eq. 6 with dt < 0); for sub-VP the forward chain is the
    Euler-Maruyama one, so the two coincide. NFE = steps·(1 + n_corrector) plus 1 for
    ``final_denoise`` (Tweedie at ε; otherwise the last step's noise-free mean is returned, as in
    the paper's code). Noise: per level one z for the predictor, then one per corrector step,
    all from ``generator``."""
    if predictor not in ("reverse_diffusion", "euler_maruyama"):
        raise ValueError(f"unknown predictor {predictor!r}")
    if corrector not in ("langevin", None):
        raise ValueError(f"unknown corrector {corrector!r}")
    ts = time_grid(sde, steps, eps)
    x = x_T
    x_mean = x
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t - t_next
        tv = _tvec(t, x)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        if predictor == "reverse_diffusion":
            f, G = sde.discretize(x, tv, dt)
            x_mean = x - f + G**2 * score(x, tv)  # eq. 46: x_i = x_{i+1} - f_{i+1} + G² s
        else:
            drift, g = reverse_drift(score, sde, x, tv)
            x_mean, G = x - drift * dt, g * math.sqrt(dt)  # Euler-Maruyama on eq. 6, dt → -dt
        x = x_mean + G * z
        if corrector == "langevin":
            alpha = sde.corrector_alpha(t_next, dt)
            for _ in range(n_corrector):
                x, x_mean = langevin_corrector_step(score, sde, x, t_next, snr, alpha, generator)
    if final_denoise:
        return tweedie_denoise(score, sde, x, ts[-1])
    return x_mean
