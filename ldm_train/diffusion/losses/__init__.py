"""The training objectives, one per formulation, as one callable.

``build_objective(cfg)(denoiser, x0, context, null_context, schedule, generator) -> (loss, stats)``
is L_simple with the configured weighting, offset noise and timestep sampling (:mod:`.simple`),
Improved DDPM's hybrid L_simple + λ L_vlb when the variance is learned (:mod:`.vlb`), or the
score-matching objectives of the score-based formulations (:mod:`.score`).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from ldm_train.config import DiffusionConfig
from ldm_train.diffusion.losses.score import build_score_objective
from ldm_train.diffusion.losses.simple import diffusion_loss, hybrid_loss

Objective = Callable[..., tuple]


def build_objective(cfg: DiffusionConfig) -> Objective:
    if cfg.formulation != "ddpm":
        return build_score_objective(cfg)
    if cfg.iddpm.learned_variance:
        loss = partial(hybrid_loss, vlb_weight=cfg.iddpm.vlb_weight)
    else:
        lc = cfg.loss
        loss = partial(diffusion_loss, weighting=lc.weighting, min_snr_gamma=lc.min_snr_gamma,
                       sigma_data=lc.sigma_data, offset_noise=lc.offset_noise,
                       timestep_sampling=lc.timestep_sampling, logit_mean=lc.logit_mean, logit_std=lc.logit_std)

    def objective(denoiser, x0, context, null_context, schedule, generator):
        return loss(denoiser, x0, context, null_context, schedule, cfg.prediction_type, cfg.cond_drop_prob, generator)

    return objective
