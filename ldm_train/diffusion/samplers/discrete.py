"""Samplers on the discrete DDPM chain: DDIM, and DDPM ancestral sampling with Improved DDPM's
respacing and learned variance.

Papers: DDPM (Ho, Jain, Abbeel 2020), DDIM (Song, Meng, Ermon 2021), Improved DDPM (Nichol &
Dhariwal 2021), "Common diffusion noise schedules and sample steps are flawed" (Lin et al. 2024).

Code name           -> paper symbol
``model``           -> :class:`~ldm_train.diffusion.parameterization.DiscreteModel`: (x_t, t) ->
                       (x̂_0, ε̂, v_var), with the schedule's ᾱ table as ``model.schedule``
``timesteps``       -> the grid: descending integer t, a subsequence S of {0..T-1} (Improved DDPM
                       sec. 4 "respacing"); step i goes from S_i to S_{i+1}, the last to ᾱ_prev = 1
``alpha_bar``       -> ᾱ_t (DDIM writes it α_t; we keep DDPM's bar notation); ``alpha_bar_prev`` -> ᾱ_{S_{i+1}}
``sigma``           -> σ_t(η) (DDIM eq. 16); η = ``eta``: 0 = deterministic DDIM, 1 = DDPM-like
``beta``            -> β_t of the respaced chain, 1 - ᾱ_t / ᾱ_prev (= β_t when every step is kept)
``beta_tilde``      -> β̃_t = (1 - ᾱ_prev) / (1 - ᾱ_t) · β_t, the posterior variance (DDPM eq. 7)
``variance``        -> σ_t² of a DDPM step: β̃_t ("fixed_small"), β_t ("fixed_large") or
                       exp(frac log β_t + (1 - frac) log β̃_t), frac = (v_var + 1)/2 ("learned_range")
``z``               -> z ~ N(0, I)

Grids follow diffusers: :func:`ddim_timesteps` is ``DDIMScheduler.set_timesteps`` (``leading``
spacing with ``steps_offset=1`` is Stable Diffusion's: T=1000, 50 steps -> 981, 961, ..., 1;
``trailing`` -> 999, 979, ..., 19); DDPM's default offset 0 is ``DDPMScheduler``'s, ending at t = 0.
DDIM's last step goes to ᾱ_prev = 1 by default (``set_alpha_to_one``), so it returns the final x̂_0
exactly; ``set_alpha_to_one=False`` uses ᾱ_0 (SD's scheduler config) for step-exact SD parity.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field

from ldm_train.diffusion.parameterization import DiscreteModel
from ldm_train.diffusion.schedule import NoiseSchedule

Spacing = Literal["leading", "trailing", "quadratic"]
Variance = Literal["auto", "fixed_small", "fixed_large", "learned_range"]


# -- grids ------------------------------------------------------------------------------------
def ddim_timesteps(num_train_timesteps: int, steps: int, spacing: Spacing = "leading", steps_offset: int = 1
                   ) -> torch.Tensor:
    """Descending int64 timesteps ``[steps]``, identical to diffusers' ``DDIMScheduler.set_timesteps``
    with the same ``timestep_spacing`` and ``steps_offset`` (Lin et al. 2023, Table 2)."""
    T = num_train_timesteps
    if not 0 < steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "leading":
        ts = torch.arange(steps, dtype=torch.int64) * (T // steps) + steps_offset
    elif spacing == "trailing":
        # float ratio T/steps; torch.round rounds half to even like numpy, as diffusers does
        ts = torch.arange(steps, dtype=torch.float64) * (T / steps)
        return torch.round(T - ts).to(torch.int64) - 1
    elif spacing == "quadratic":
        # DDIM sec. 5 / App. D.2 (their CIFAR-10 setting): tau_i = floor((sqrt(0.8 T) i / (S-1))^2),
        # dense near t = 0; the offset keeps the timesteps distinct when S is close to T.
        ts = (torch.linspace(0, math.sqrt(T * 0.8), steps, dtype=torch.float64) ** 2).floor().to(torch.int64)
        ts = torch.maximum(ts, torch.arange(steps, dtype=torch.int64))
        if ts.unique().numel() != steps:
            raise ValueError(f"quadratic spacing gives repeated timesteps for {steps} of {T}; use fewer steps")
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected leading, trailing or quadratic")
    if ts.max() >= T:
        raise ValueError(f"steps_offset={steps_offset} pushes timestep {int(ts.max())} past T-1={T - 1}; "
                         "use fewer steps or spacing='trailing'")
    return ts.flip(0)


def ddim_grid(schedule: NoiseSchedule, steps: int, *, spacing: Spacing = "leading",
              steps_offset: Annotated[int, Field(ge=0)] = 1) -> torch.Tensor:
    """DDIM's grid: :func:`ddim_timesteps` with diffusers' DDIMScheduler defaults."""
    return ddim_timesteps(schedule.num_train_timesteps, steps, spacing, steps_offset)


def ddpm_grid(schedule: NoiseSchedule, steps: int | None, *, spacing: Spacing = "leading",
              steps_offset: Annotated[int, Field(ge=0)] = 0) -> torch.Tensor:
    """DDPM's grid: all T timesteps for ``steps=None`` (or T), else the respaced
    :func:`ddim_timesteps` with DDPMScheduler's offset 0."""
    T = schedule.num_train_timesteps
    if steps is None:
        return torch.arange(T - 1, -1, -1, dtype=torch.int64)
    return ddim_timesteps(T, steps, spacing, steps_offset)


# -- steps ------------------------------------------------------------------------------------
def ddim_step(x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, alpha_bar: float, alpha_bar_prev: float,
              eta: float, z: torch.Tensor | None) -> torch.Tensor:
    """One DDIM update x_t -> x_{t_prev} (DDIM eq. 12) with σ_t(η) from eq. 16. ``alpha_bar`` and
    ``alpha_bar_prev`` are Python floats (float64 maths, no device transfers); ``z`` ~ N(0, I) or
    None for η = 0."""
    # eq. 16: σ_t = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev)
    sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
    # eq. 12: x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ²) ε_θ + σ z
    direction = math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0))
    x_prev = math.sqrt(alpha_bar_prev) * x0 + direction * eps
    return x_prev if z is None else x_prev + sigma * z


def ddpm_step(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: float, alpha_bar_prev: float,
              variance: Variance = "fixed_small", v_var: torch.Tensor | None = None,
              z: torch.Tensor | None = None) -> torch.Tensor:
    """One ancestral step x_t -> x_prev ~ N(μ̃_t(x_t, x̂_0), σ_t² I) (DDPM eq. 6-7, Alg. 2) on the
    respaced chain, β_t = 1 - ᾱ_t/ᾱ_prev; ``z`` None returns the mean (the last step)."""
    beta = 1 - alpha_bar / alpha_bar_prev  # Improved DDPM sec. 4 (respacing)
    # DDPM eq. 7: μ̃ = sqrt(ᾱ_prev) β / (1 - ᾱ_t) x̂_0 + sqrt(α_t) (1 - ᾱ_prev) / (1 - ᾱ_t) x_t
    c0 = math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)
    ct = math.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar)
    mean = c0 * x0 + ct * x_t
    if z is None:
        return mean
    beta_tilde = max((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, 1e-20)  # DDPM eq. 7 (clamped like diffusers)
    if variance == "fixed_small":
        return mean + math.sqrt(beta_tilde) * z  # DDPM sec. 3.2, σ_t² = β̃_t
    if variance == "fixed_large":
        return mean + math.sqrt(beta) * z  # DDPM sec. 3.2, σ_t² = β_t
    if v_var is None:
        raise ValueError("learned_range needs the model's variance output (2C output channels)")
    frac = (v_var + 1) / 2  # v ∈ [-1, 1] -> [0, 1]
    # Nichol & Dhariwal eq. 15: Σ = exp(v log β_t + (1 - v) log β̃_t)
    log_var = frac * math.log(beta) + (1 - frac) * math.log(beta_tilde)
    return mean + torch.exp(0.5 * log_var) * z


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _tvec(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device)


# -- samplers ---------------------------------------------------------------------------------
@torch.no_grad()
def sample_ddim(model: DiscreteModel, x: torch.Tensor, timesteps: torch.Tensor, *, generator=None, callback=None,
                eta: Annotated[float, Field(ge=0)] = 0.0, set_alpha_to_one: bool = True) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) from x_T = ``x`` over ``timesteps``. For η > 0 a fresh
    z ~ N(0, I) comes from ``generator`` at every step (as DDIMScheduler draws it), so equal
    ``x`` and seed give bitwise-equal samples. ``callback(i, x)`` after step i."""
    table = model.schedule.alphas_cumprod.tolist()
    final = 1.0 if set_alpha_to_one else table[0]
    for i, t in enumerate(timesteps.tolist()):
        pred = model(x, _tvec(t, x))
        alpha_bar_prev = table[int(timesteps[i + 1])] if i + 1 < len(timesteps) else final
        z = _randn(x, generator) if eta > 0 else None
        x = ddim_step(x, pred.x0, pred.eps, table[t], alpha_bar_prev, eta, z)
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_ddpm(model: DiscreteModel, x: torch.Tensor, timesteps: torch.Tensor, *, generator=None, callback=None,
                variance: Variance = "auto") -> torch.Tensor:
    """Ancestral sampling (DDPM Alg. 2) from x_T = ``x`` over the (respaced) ``timesteps``.

    ``variance="auto"``: Improved DDPM's learned range when the network predicts a variance
    (2C output channels), else β̃_t. z ~ N(0, I) comes from ``generator`` at every step but the
    last, in the order diffusers' ``DDPMScheduler`` draws it. ``callback(i, x)`` after step i."""
    table = model.schedule.alphas_cumprod.tolist()
    K = len(timesteps)
    for i, t in enumerate(timesteps.tolist()):
        pred = model(x, _tvec(t, x))
        kind = variance if variance != "auto" else ("learned_range" if pred.v_var is not None else "fixed_small")
        alpha_bar_prev = table[int(timesteps[i + 1])] if i + 1 < K else 1.0
        z = _randn(x, generator) if i + 1 < K else None
        x = ddpm_step(x, pred.x0, table[t], alpha_bar_prev, kind, pred.v_var, z)
        if callback is not None:
            callback(i, x)
    return x
