"""The DDPM forward process q(x_t | x_0) and its parameterisations.

Papers: DDPM (Ho, Jain, Abbeel 2020), Improved DDPM (Nichol & Dhariwal 2021),
progressive distillation / v-prediction (Salimans & Ho 2022).

Code name          -> paper symbol
``betas``          -> β_t, per-step noise variance, t = 0 .. T-1 (DDPM eq. 2)
``alphas_cumprod`` -> ᾱ_t = Π_{s<=t} (1 - β_s)              (DDPM eq. 4)
``x0``             -> x_0, clean data (here: VAE latents)
``eps``            -> ε ~ N(0, I)
``x_t``            -> x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε   (DDPM eq. 4, reparameterised)
``v``              -> v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0     (Salimans & Ho, sec. 4)
``t``              -> integer timestep in [0, T), T = ``num_train_timesteps``

Timesteps are 0-based like diffusers: ``alphas_cumprod[0]`` is the least noisy level.
Tables are kept in float64; each use casts the gathered coefficients to the input's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ldm_train.config import DiffusionConfig

BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
PredictionType = Literal["epsilon", "v_prediction"]


def _cosine_alpha_bar(u: float, s: float = 0.008) -> float:
    # Improved DDPM eq. 17: f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); ᾱ_t = f(t)/f(0) (f(0) cancels below)
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def make_betas(
    kind: BetaSchedule, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """β_1..β_T as a float64 tensor ``[T]``.

    ``linear``: DDPM sec. 4, linspace(beta_start, beta_end).
    ``scaled_linear``: Stable Diffusion, linspace(sqrt(beta_start), sqrt(beta_end)) ** 2.
    ``cosine``: Improved DDPM eq. 17 with s = 0.008, β_t = 1 - ᾱ_t/ᾱ_{t-1} clipped at 0.999
    (diffusers' ``squaredcos_cap_v2``; beta_start/beta_end are ignored).
    """
    T = num_train_timesteps
    if T <= 0:
        raise ValueError(f"num_train_timesteps must be positive, got {T}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if kind == "cosine":
        betas = [1 - _cosine_alpha_bar((i + 1) / T) / _cosine_alpha_bar(i / T) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float64).clamp(max=0.999)  # Improved DDPM sec. 3.2
    raise ValueError(f"unknown beta schedule {kind!r}; expected linear, scaled_linear or cosine")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """β_t and ᾱ_t tables (float64, shape ``[T]``). Build with :func:`build_schedule` or
    :meth:`from_betas`; all methods take ``t`` as an int64 tensor ``[B]``."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    num_train_timesteps: int

    def __post_init__(self) -> None:
        T = self.num_train_timesteps
        if self.betas.shape != (T,) or self.alphas_cumprod.shape != (T,):
            raise ValueError(f"betas/alphas_cumprod must have shape [{T}]")

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        betas = betas.to(torch.float64)
        return cls(betas, torch.cumprod(1.0 - betas, dim=0), betas.shape[0])  # ᾱ_t, DDPM eq. 4

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t gathered for each sample, float64, shape [B, 1, ..., 1] (not yet cast)."""
        table = self.alphas_cumprod
        if like.device.type == "mps":  # MPS has no float64
            table = table.float()
        a = table.to(like.device)[t.to(like.device)]
        return a.view(-1, *([1] * (like.dim() - 1)))

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(ᾱ_t), sqrt(1 - ᾱ_t)) in ``like``'s dtype, broadcastable to ``like``."""
        a = self.alpha_bar(t, like)
        return a.sqrt().to(like.dtype), (1 - a).sqrt().to(like.dtype)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0): sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (DDPM eq. 4, reparameterised)."""
        sa, s1a = self._coefs(t, x0)
        return sa * x0 + s1a * eps

    def v_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022, sec. 4)."""
        sa, s1a = self._coefs(t, x0)
        return sa * eps - s1a * x0

    def pred_to_x0_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: PredictionType
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a network output to (x̂_0, ε̂) at noise level t."""
        sa, s1a = self._coefs(t, x_t)
        if prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - s1a * eps) / sa  # DDIM eq. 9 (the "predicted x_0")
        elif prediction_type == "v_prediction":
            # Salimans & Ho sec. 4: x_0 = sqrt(ᾱ) x_t - sqrt(1-ᾱ) v ; ε = sqrt(1-ᾱ) x_t + sqrt(ᾱ) v
            x0 = sa * x_t - s1a * model_output
            eps = s1a * x_t + sa * model_output
        else:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon or v_prediction")
        return x0, eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction_type: PredictionType):
        """The regression target for ``prediction_type``: ε, or v."""
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "v_prediction":
            return self.v_target(x0, eps, t)
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon or v_prediction")


def build_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    """The schedule described by the ``diffusion`` config section."""
    betas = make_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
    return NoiseSchedule.from_betas(betas)
