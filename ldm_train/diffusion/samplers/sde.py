"""Samplers of the score SDEs (Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole 2021): the
probability-flow ODE and predictor-corrector sampling.

Code name            -> paper symbol
``model``            -> :class:`~ldm_train.diffusion.parameterization.SDEScore`: score(x, t) ≈ ∇_x log p_t(x),
                        with the forward SDE as ``model.sde`` (drift f, diffusion g, its discrete chain)
``times``            -> the grid t_0 = T > t_1 > ... > t_N = ε (uniform, App. C; ``sde_grid``)
``snr``              -> r, the corrector's signal-to-noise ratio (Alg. 4, 5)
``n_corrector``      -> M, corrector steps per noise level (Alg. 1)
``final_denoise``    -> one last Tweedie step E[x(0) | x(ε)] (App. G, "denoising")
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field

from ldm_train.diffusion.parameterization import SDEScore
from ldm_train.diffusion.sdes import tvec, ode_drift, reverse_drift, time_grid, tweedie_denoise


def sde_grid(sde, steps: int) -> torch.Tensor:
    """``steps + 1`` uniform times from T down to the SDE's ε (float64)."""
    return torch.tensor(time_grid(sde, steps), dtype=torch.float64)


@torch.no_grad()
def sample_pf_ode(model: SDEScore, x: torch.Tensor, times: torch.Tensor, *, generator=None, callback=None,
                  method: Literal["heun", "euler"] = "heun", final_denoise: bool = True) -> torch.Tensor:
    """Integrate the probability-flow ODE dx/dt = f - ½ g² ∇ log p_t (eq. 13) from x(T) = ``x``
    down ``times``. ``euler``: 1 score call per step (1st order); ``heun``: the explicit
    trapezoidal rule (EDM Alg. 1 without churn), 2 calls per step. Deterministic (``generator``
    unused); ``final_denoise`` adds one call."""
    if method not in ("heun", "euler"):
        raise ValueError(f"unknown method {method!r}; expected heun or euler")
    sde, ts = model.sde, times.tolist()
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        h = t_next - t  # negative: integrating backwards in time
        d = ode_drift(model, sde, x, tvec(t, x))
        x_euler = x + h * d
        if method == "euler":
            x = x_euler
        else:
            d_next = ode_drift(model, sde, x_euler, tvec(t_next, x))
            x = x + h * 0.5 * (d + d_next)  # trapezoidal correction
        if callback is not None:
            callback(i, x)
    return tweedie_denoise(model, sde, x, ts[-1]) if final_denoise else x


def langevin_corrector_step(model: SDEScore, x: torch.Tensor, t: float, snr: float, alpha: float,
                            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Langevin MCMC step at time t (Alg. 4 VE / Alg. 5 VP): ε = 2 α (r ‖z‖ / ‖s‖)²,
    x ← x + ε s + sqrt(2 ε) z. As in the paper's code the norms are per-sample norms averaged
    over the batch; α = ``sde.corrector_alpha``: 1 - β_i for VP, 1 for sub-VP and VE (as the
    paper's code). Returns (x, its noise-free mean)."""
    s = model(x, tvec(t, x))
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    grad_norm = s.reshape(s.shape[0], -1).norm(dim=-1).mean()
    noise_norm = z.reshape(z.shape[0], -1).norm(dim=-1).mean()
    step = 2 * alpha * (snr * noise_norm / grad_norm) ** 2
    x_mean = x + step * s
    return x_mean + (2 * step).sqrt() * z, x_mean


@torch.no_grad()
def sample_pc(model: SDEScore, x: torch.Tensor, times: torch.Tensor, *, generator=None, callback=None,
              predictor: Literal["reverse_diffusion", "euler_maruyama"] = "reverse_diffusion",
              corrector: Literal["langevin", "none"] = "langevin", snr: Annotated[float, Field(gt=0)] = 0.16,
              n_corrector: Annotated[int, Field(ge=0)] = 1, final_denoise: bool = True) -> torch.Tensor:
    """Predictor-corrector sampling (Alg. 1; Alg. 2 for VE, Alg. 3 for VP) from x(T) = ``x``.

    Each level t_i → t_{i+1} of ``times``: one predictor step, then ``n_corrector`` Langevin
    steps at t_{i+1}. Predictors: ``reverse_diffusion`` (eq. 46-47: x ← x - f_i + G_i² s + G_i z
    with the forward chain's (f_i, G_i), i.e. ancestral sampling of Alg. 2/3) or
    ``euler_maruyama`` (reverse SDE eq. 6 with dt < 0); for sub-VP the forward chain is the
    Euler-Maruyama one, so the two coincide. NFE = steps·(1 + n_corrector) plus 1 for
    ``final_denoise`` (Tweedie at ε; otherwise the last step's noise-free mean is returned, as in
    the paper's code). Noise: per level one z for the predictor, then one per corrector step,
    all from ``generator``."""
    if predictor not in ("reverse_diffusion", "euler_maruyama"):
        raise ValueError(f"unknown predictor {predictor!r}")
    if corrector not in ("langevin", "none"):
        raise ValueError(f"unknown corrector {corrector!r}")
    sde, ts = model.sde, times.tolist()
    x_mean = x
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t - t_next
        tv = tvec(t, x)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        if predictor == "reverse_diffusion":
            f, G = sde.discretize(x, tv, dt)
            x_mean = x - f + G**2 * model(x, tv)  # eq. 46: x_i = x_{i+1} - f_{i+1} + G² s
        else:
            drift, g = reverse_drift(model, sde, x, tv)
            x_mean, G = x - drift * dt, g * math.sqrt(dt)  # Euler-Maruyama on eq. 6, dt → -dt
        x = x_mean + G * z
        if corrector == "langevin":
            alpha = sde.corrector_alpha(t_next, dt)
            for _ in range(n_corrector):
                x, x_mean = langevin_corrector_step(model, x, t_next, snr, alpha, generator)
        if callback is not None:
            callback(i, x)
    return tweedie_denoise(model, sde, x, ts[-1]) if final_denoise else x_mean
