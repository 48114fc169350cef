"""What the network predicts, and the one conversion between x_0, ε, v and the score.

Papers: DDPM (Ho et al. 2020), DDIM (Song et al. 2021, eq. 9), v-prediction (Salimans & Ho 2022,
sec. 4), EDM (Karras et al. 2022, Table 1), score SDEs (Song et al. 2021); k-diffusion's
``DiscreteSchedule`` for t(σ).

Code name          -> paper symbol
``out``            -> the network output: ε_θ ("epsilon"), v_θ ("v_prediction") or x_θ ("sample",
                      diffusers' name for x_0 prediction); with a learned variance (Improved DDPM)
                      2C channels, the last C being the variance interpolation ``v_var`` ∈ [-1, 1]
``sa``, ``s1a``    -> sqrt(ᾱ_t), sqrt(1 - ᾱ_t): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (DDPM eq. 4)
``x0``, ``eps``    -> x̂_0, ε̂ recovered from ``out`` at x_t
``v``              -> sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0
``sigma``          -> σ = sqrt((1 - ᾱ) / ᾱ), the VE noise level: x = x_t / sqrt(ᾱ) = x_0 + σ ε (EDM)
``D``              -> D_θ(x; σ) -> x̂_0, EDM's denoiser (eq. 2-3), the model of the σ samplers
``score``          -> ∇_x log p_t(x) ≈ -ε̂ / std(t) for an ε-parameterised score network

Every sampler family calls its model in its own coordinates; the builders here turn a (guided)
network ``net_fn(x, t)`` into those models, so no sampler converts anything itself:
:class:`DiscreteModel` (x_t, integer t) -> (x̂_0, ε̂, v_var), :func:`sigma_denoiser` D(x, σ),
:class:`SDEScore` and :class:`NCSNScore` score(x, t or σ).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch

from ldm_train.diffusion.schedule import NoiseSchedule

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # net_fn(x, t) -> out, context bound
MIN_ALPHA_BAR = 2.0**-24  # diffusers' floor for ᾱ_{T-1} under zero terminal SNR
TIME_SCALE = 999.0  # score models see τ = 999 t (SDEs) or 999 i / (L - 1) (NCSN), as DDPM++ code does


def to_x0_eps(out: torch.Tensor, x_t: torch.Tensor, sa, s1a, prediction_type: PredictionType
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from the network output at x_t, where ``sa``/``s1a`` are sqrt(ᾱ_t), sqrt(1 - ᾱ_t)
    (tensors broadcastable to x_t, or floats). The one place this conversion is written.

    v and x_0 stay finite at zero SNR (ᾱ_t = 0 gives x̂_0 = -v, ε̂ = x_t); ε-prediction cannot give
    x_0 there, which :mod:`ldm_train.diffusion.checks` refuses before any work starts."""
    if prediction_type == "epsilon":
        return (x_t - s1a * out) / sa, out  # DDIM eq. 9, the "predicted x_0"
    if prediction_type == "v_prediction":
        # Salimans & Ho sec. 4: x_0 = sqrt(ᾱ) x_t - sqrt(1-ᾱ) v ; ε = sqrt(1-ᾱ) x_t + sqrt(ᾱ) v
        return sa * x_t - s1a * out, s1a * x_t + sa * out
    if prediction_type == "sample":
        return out, (x_t - sa * out) / s1a  # DDPM eq. 4 solved for ε; 1 - ᾱ_t >= β_0 > 0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def check_prediction(prediction_type: str, schedule: NoiseSchedule | None = None) -> None:
    """Refuse an unknown ``prediction_type``, and ε-prediction on a zero-terminal-SNR ``schedule``:
    there x_{T-1} = ε exactly and x̂_0 = (x_t - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ) divides by zero (Lin et al.
    2024, sec. 3.2). The models below call it when built; configs are refused earlier, naming their
    keys, by :mod:`ldm_train.diffusion.checks`."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    if prediction_type == "epsilon" and schedule is not None and schedule.zero_terminal_snr:
        raise ValueError("epsilon prediction is ill-posed with a zero-terminal-SNR schedule (zero terminal SNR: "
                         "alpha_bar_T = 0, x_0 cannot be recovered from eps); use 'v_prediction' or 'sample'")


def predict(schedule: NoiseSchedule, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
            prediction_type: PredictionType) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) at integer timesteps ``t`` ``[B]`` of ``schedule`` (:func:`to_x0_eps`)."""
    sa, s1a = schedule.coefs(t, x_t)
    return to_x0_eps(out, x_t, sa, s1a, prediction_type)


def target(schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
           prediction_type: PredictionType) -> torch.Tensor:
    """The regression target for ``prediction_type``: ε, v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0, or x_0."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        sa, s1a = schedule.coefs(t, x0)
        return sa * eps - s1a * x0  # Salimans & Ho sec. 4
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


# -- discrete time: DDIM, DDPM ----------------------------------------------------------------
class Prediction(NamedTuple):
    x0: torch.Tensor
    eps: torch.Tensor
    v_var: torch.Tensor | None  # Improved DDPM's variance interpolation, when the network predicts it


@dataclass(frozen=True)
class DiscreteModel:
    """``model(x_t, t) -> Prediction`` at integer timesteps ``t`` ``[B]`` of ``schedule``; the
    model of the discrete samplers (DDIM, DDPM), which also read ``model.schedule``."""

    net_fn: ModelFn
    schedule: NoiseSchedule
    prediction_type: PredictionType

    def __post_init__(self) -> None:
        check_prediction(self.prediction_type, self.schedule)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        C = x_t.shape[1]
        out = self.net_fn(x_t, t)
        x0, eps = predict(self.schedule, out[:, :C], x_t, t, self.prediction_type)
        return Prediction(x0, eps, out[:, C:] if out.shape[1] > C else None)


# -- continuous σ: the EDM / k-diffusion samplers -------------------------------------------
SigmaDenoiser = Callable[[torch.Tensor, "torch.Tensor | float"], torch.Tensor]


def discrete_sigmas(schedule: NoiseSchedule) -> torch.Tensor:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) for t = 0..T-1, float64 ``[T]``, ascending (EDM Table 1, VP).

    ᾱ_{T-1} = 0 (zero terminal SNR) would give σ_{T-1} = inf; like diffusers' Euler and DPM-Solver
    schedulers we floor ᾱ at ``MIN_ALPHA_BAR`` = 2^-24, so σ_{T-1} ≈ 4096 stays finite."""
    ac = schedule.alphas_cumprod.to(torch.float64).clamp(min=MIN_ALPHA_BAR)
    return ((1 - ac) / ac).sqrt()


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """Fractional timestep t(σ) by interpolating linearly in log σ between the two neighbouring
    discrete levels of ``sigmas`` (ascending ``[T]``); clamped to [0, T-1]. Same maths as
    k-diffusion's ``DiscreteSchedule.sigma_to_t`` and diffusers' ``_sigma_to_t``; ``quantize``
    rounds it (diffusers' DPMSolverMultistepScheduler rounds its Karras timesteps). float64."""
    log_sigmas = sigmas.to(torch.float64).log()
    log_sigma = sigma.to(torch.float64).clamp(min=1e-10).log()
    dists = log_sigma.reshape(1, -1) - log_sigmas.reshape(-1, 1)
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
    t = (1 - w) * low + w * high
    if quantize:
        t = t.round()
    return t.reshape(sigma.shape)


def sigma_denoiser(net_fn: ModelFn, schedule: NoiseSchedule, prediction_type: PredictionType = "epsilon",
                   quantize: bool = False) -> SigmaDenoiser:
    """``D(x, σ) -> x̂_0`` in EDM/VE coordinates (x = x_0 + σ ε) from a discrete-time network.

    The network sees x_t = x / sqrt(1 + σ²) (EDM's c_in for a VP-trained net) at t(σ)
    (:func:`sigma_to_t`, a float32 tensor ``[B]``). Since ᾱ = 1/(1 + σ²), x_t = sqrt(ᾱ) x, and the
    x̂_0 of :func:`to_x0_eps` at x_t is D directly. Learned-variance channels beyond C are dropped.
    ``sigma`` is a float, a 0-dim or a ``[B]`` tensor; finite and > 0."""
    check_prediction(prediction_type)
    sigmas = discrete_sigmas(schedule)

    def D(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        B, C = x.shape[0], x.shape[1]
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(B).cpu()
        t = sigma_to_t(s, sigmas, quantize).to(device=x.device, dtype=torch.float32)
        s_b = s.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
        c_in = 1 / (s_b**2 + 1).sqrt()  # sqrt(ᾱ)
        x_t = x * c_in
        x0, _ = to_x0_eps(net_fn(x_t, t)[:, :C], x_t, c_in, s_b * c_in, prediction_type)
        return x0

    return D


# -- score models: SDEs and NCSN --------------------------------------------------------------
@dataclass(frozen=True)
class SDEScore:
    """``score(x, t) -> ∇_x log p_t(x)`` at float times ``t`` ``[B]`` of ``sde``, which the SDE
    samplers also read (drift, diffusion, prior)."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sde: object

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fn(x, t)


def sde_score(net_fn: ModelFn, sde) -> SDEScore:
    """s_θ(x, t) = -ε̂(x, 999 t) / std(t) for an ε-parameterised network (Song et al. 2021)."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, std = sde.marginal(t)
        return -net_fn(x, TIME_SCALE * t) / std.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))

    return SDEScore(fn, sde)


def ncsn_score(net_fn: ModelFn, sigmas: torch.Tensor) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """s_θ(x, σ_i) = -ε̂(x, 999 i / (L - 1)) / σ_i at NCSN's noise levels ``sigmas`` (descending)."""
    L = sigmas.shape[0]
    level = {float(s): i for i, s in enumerate(sigmas.tolist())}

    def score(x: torch.Tensor, sigma: float) -> torch.Tensor:
        tau = torch.full((x.shape[0],), TIME_SCALE * level[float(sigma)] / max(1, L - 1), device=x.device)
        return -net_fn(x, tau) / sigma

    return score
