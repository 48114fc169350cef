"""The DDPM forward process q(x_t | x_0) and its parameterisations.

Papers: DDPM (Ho, Jain, Abbeel 2020), Improved DDPM (Nichol & Dhariwal 2021),
progressive distillation / v-prediction (Salimans & Ho 2022), "Common diffusion noise schedules
and sample steps are flawed" (Lin, Liu, Li, Yang 2024; zero terminal SNR), EDM (Karras et al. 2022).

Code name          -> paper symbol
``betas``          -> β_t, per-step noise variance, t = 0 .. T-1 (DDPM eq. 2)
``alphas_cumprod`` -> ᾱ_t = Π_{s<=t} (1 - β_s)              (DDPM eq. 4)
``x0``             -> x_0, clean data (here: VAE latents)
``eps``            -> ε ~ N(0, I)
``x_t``            -> x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε   (DDPM eq. 4, reparameterised)
``v``              -> v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0     (Salimans & Ho, sec. 4)
``t``              -> integer timestep in [0, T), T = ``num_train_timesteps``
``snr``            -> SNR(t) = ᾱ_t / (1 - ᾱ_t)                   (Kingma et al. 2021, eq. 2)
``sigmas``         -> σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), the VE-equivalent noise level of x_t / sqrt(ᾱ_t)
                      (EDM sec. 2 / k-diffusion's discrete sigmas); +inf at zero terminal SNR
``posterior_*``    -> q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I)       (DDPM eq. 6-7)
                      μ̃_t = c_0 x_0 + c_t x_t,  β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t, ᾱ_{-1} := 1
(x_0, ε, v and the network's output are converted into each other in :mod:`parameterization`.)

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


def _cosine_alpha_bar(u: float, s: float = 0.008) -> float:
    # Improved DDPM eq. 17: f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); ᾱ_t = f(t)/f(0) (f(0) cancels below)
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale β so that ᾱ_{T-1} = 0 (SNR 0 at the last step) while keeping ᾱ_0 (Lin et al. 2024, Alg. 1).

    sqrt(ᾱ) is shifted so its last value is 0 and scaled so its first value is unchanged; β is
    recovered from the ratios of consecutive ᾱ. Returns float64 ``[T]``; the last β is exactly 1.
    Identical to diffusers' ``rescale_zero_terminal_snr`` (``rescale_betas_zero_snr=True``)."""
    betas = betas.to(torch.float64)
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()  # Alg. 1, line 3
    a0, aT = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()  # line 6-7
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))  # lines 10-13: shift, then scale
    alphas_bar = alphas_bar_sqrt**2  # line 16
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])  # lines 17-18
    return 1.0 - alphas  # line 19


def make_betas(
    kind: BetaSchedule, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
    rescale_zero_snr: bool = False,
) -> torch.Tensor:
    """β_1..β_T as a float64 tensor ``[T]``.

    ``rescale_zero_snr``: apply :func:`rescale_zero_terminal_snr` (Lin et al. 2024) afterwards.

    ``linear``: DDPM sec. 4, linspace(beta_start, beta_end).
    ``scaled_linear``: Stable Diffusion, linspace(sqrt(beta_start), sqrt(beta_end)) ** 2.
    ``cosine``: Improved DDPM eq. 17 with s = 0.008, β_t = 1 - ᾱ_t/ᾱ_{t-1} clipped at 0.999
    (diffusers' ``squaredcos_cap_v2``; beta_start/beta_end are ignored).
    """
    T = num_train_timesteps
    if T <= 0:
        raise ValueError(f"num_train_timesteps must be positive, got {T}")
    if kind == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    elif kind == "cosine":
        betas = [1 - _cosine_alpha_bar((i + 1) / T) / _cosine_alpha_bar(i / T) for i in range(T)]
        betas = torch.tensor(betas, dtype=torch.float64).clamp(max=0.999)  # Improved DDPM sec. 3.2
    else:
        raise ValueError(f"unknown beta schedule {kind!r}; expected linear, scaled_linear or cosine")
    return rescale_zero_terminal_snr(betas) if rescale_zero_snr else betas


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

    def _gather(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
        """``table[t]``: float64 ``[B]`` if ``like`` is None, else cast to ``like``'s dtype and shaped
        ``[B, 1, ..., 1]`` to broadcast against it."""
        if like is None:
            return table.to(t.device)[t]
        if like.device.type == "mps":  # MPS has no float64
            table = table.float()
        out = table.to(like.device)[t.to(like.device)]
        return out.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """ᾱ_{t-1} with ᾱ_{-1} := 1 (DDPM eq. 7 at t = 1), float64 ``[T]``."""
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])

    @property
    def zero_terminal_snr(self) -> bool:
        """True when ᾱ_{T-1} = 0 (Lin et al. 2024): x_{T-1} holds no signal."""
        return bool(self.alphas_cumprod[-1] <= 0.0)

    @property
    def sigmas(self) -> torch.Tensor:
        """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), float64 ``[T]`` ascending (k-diffusion's discrete sigmas, EDM
        sec. 2: x_t / sqrt(ᾱ_t) = x_0 + σ_t ε). +inf where ᾱ_t = 0."""
        a = self.alphas_cumprod
        return ((1 - a) / a).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 - ᾱ_t) = 1 / σ_t², float64 ``[B]`` (0 at zero terminal SNR)."""
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1 - a)

    def posterior_mean_coef(
        self, t: torch.Tensor, like: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_0, c_t) of μ̃_t(x_t, x_0) = c_0 x_0 + c_t x_t (DDPM eq. 7):
        c_0 = sqrt(ᾱ_{t-1}) β_t / (1 - ᾱ_t),  c_t = sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t).
        At t = 0 (ᾱ_{-1} = 1) this is (1, 0): x_{-1} = x_0. See :meth:`_gather` for ``like``."""
        a, a_prev, b = self.alphas_cumprod, self.alphas_cumprod_prev, self.betas
        c0 = a_prev.sqrt() * b / (1 - a)
        ct = (1 - b).sqrt() * (1 - a_prev) / (1 - a)
        return self._gather(c0, t, like), self._gather(ct, t, like)

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """μ̃_t(x_t, x_0) (DDPM eq. 7)."""
        c0, ct = self.posterior_mean_coef(t, x_t)
        return c0 * x0 + ct * x_t

    def _posterior_variance_table(self) -> torch.Tensor:
        # DDPM eq. 7: β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t  (β̃_0 = 0)
        return (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod) * self.betas

    def posterior_variance(self, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t (DDPM eq. 7); 0 at t = 0."""
        return self._gather(self._posterior_variance_table(), t, like)

    def posterior_log_variance_clipped(self, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """log β̃_t with β̃_0 replaced by β̃_1 (ADM's clipping, as β̃_0 = 0 has no log)."""
        var = self._posterior_variance_table()
        var = torch.cat([var[1:2], var[1:]]) if var.shape[0] > 1 else self.betas.clone()
        return self._gather(var.log(), t, like)

    def log_beta(self, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """log β_t (the upper bound of the reverse variance, Improved DDPM sec. 3.1)."""
        return self._gather(self.betas.log(), t, like)

    def coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(ᾱ_t), sqrt(1 - ᾱ_t)) in ``like``'s dtype, broadcastable to ``like``."""
        a = self.alpha_bar(t, like)
        return a.sqrt().to(like.dtype), (1 - a).sqrt().to(like.dtype)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0): sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (DDPM eq. 4, reparameterised)."""
        sa, s1a = self.coefs(t, x0)
        return sa * x0 + s1a * eps


def build_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    """The schedule described by the ``diffusion`` config section."""
    rescale = cfg.rescale_betas_zero_snr
    betas = make_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, rescale)
    return NoiseSchedule.from_betas(betas)
