"""One entry point from the ``eval`` config section to the samplers of this package.

``sample_from_config(denoiser, noise, context, null_context, schedule, eval_cfg, diffusion_cfg,
generator)`` returns x_0 latents with the configured sampler:

- ``ddim``: DDIM (Song et al. 2021) with ``eta`` and ``spacing``;
- ``ddpm``: DDPM ancestral (Ho et al. 2020), respaced to ``steps`` (fixed small variance, or the
  learned variance when ``diffusion.learned_variance``);
- ``iddpm``: Improved DDPM respacing with the learned variance (Nichol & Dhariwal 2021);
- ``euler``, ``heun``, ``dpmpp_2m``: on the Karras et al. 2022 sigma grid (``s_churn`` for
  Euler/Heun); DPM-Solver++(2M) of Lu et al. 2022;
- ``pf_ode``, ``pc``: probability-flow ODE and predictor-corrector for the SDE formulations;
  ``annealed_langevin`` for NCSN (see ``score_based``).
"""
from __future__ import annotations

import torch

from ldm_train.config import DiffusionConfig, EvalConfig
from ldm_train.diffusion.ddpm import ddpm_sample
from ldm_train.diffusion.karras import karras_sample
from ldm_train.diffusion.losses import Denoiser
from ldm_train.diffusion.samplers import ddim_sample
from ldm_train.diffusion.schedule import NoiseSchedule
from ldm_train.diffusion.score_based import sample_score_based


def sample_from_config(
    denoiser: Denoiser,
    noise: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor,
    schedule: NoiseSchedule,
    eval_cfg: EvalConfig,
    diffusion_cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    if diffusion_cfg.formulation != "ddpm":
        return sample_score_based(denoiser, noise, context, null_context, eval_cfg, diffusion_cfg, generator)
    common = dict(guidance_scale=eval_cfg.guidance_scale, prediction_type=diffusion_cfg.prediction_type, generator=generator)
    name = eval_cfg.sampler
    if name == "ddim":
        return ddim_sample(
            denoiser, noise, context, null_context, schedule, eval_cfg.steps, eta=eval_cfg.eta,
            spacing=eval_cfg.spacing, progress=progress, **common,
        )
    if name in ("ddpm", "iddpm"):
        variance = "learned_range" if diffusion_cfg.learned_variance else "fixed_small"
        return ddpm_sample(
            denoiser, noise, context, null_context, schedule, steps=eval_cfg.steps, variance=variance,
            spacing=eval_cfg.spacing, progress=progress, **common,
        )
    return karras_sample(
        denoiser, noise, context, null_context, schedule, eval_cfg.steps, sampler=name, s_churn=eval_cfg.s_churn, **common
    )
