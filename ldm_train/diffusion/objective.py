"""The training objective selected by the ``diffusion`` config section, as one callable.

``build_objective(cfg)(denoiser, x0, context, null_context, schedule, generator) -> (loss, stats)``
is L_simple with the configured weighting, offset noise and timestep sampling (``diffusion_loss``),
or Improved DDPM's hybrid L_simple + λ L_vlb when the variance is learned (``hybrid_loss``), or
the score-matching objectives of the score-based formulations (``score_based``).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from ldm_train.config import DiffusionConfig
from ldm_train.diffusion.losses import diffusion_loss
from ldm_train.diffusion.score_based import build_score_objective
from ldm_train.diffusion.vlb import hybrid_loss

Objective = Callable[..., tuple]


def build_objective(cfg: DiffusionConfig) -> Objective:
    if cfg.formulation != "ddpm":
        return build_score_objective(cfg)
    if cfg.learned_variance:
        loss = partial(hybrid_loss, vlb_weight=cfg.vlb_weight)
    else:
        loss = partial(
            diffusion_loss,
            weighting=cfg.loss_weighting,
            min_snr_gamma=cfg.min_snr_gamma,
            sigma_data=cfg.sigma_data,
            offset_noise=cfg.offset_noise,
            timestep_sampling=cfg.timestep_sampling,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
        )

    def objective(denoiser, x0, context, null_context, schedule, generator):
        return loss(denoiser, x0, context, null_context, schedule, cfg.prediction_type, cfg.cond_drop_prob, generator)

    return objective
