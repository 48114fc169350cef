"""Pure-tensor diffusion maths: noise schedules, the training loss and DDIM sampling.

No distributed/accelerator imports here (a test enforces it); training loops wrap these functions.
"""
from ldm_train.diffusion.losses import Denoiser, diffusion_loss, drop_context
from ldm_train.diffusion.samplers import ddim_sample, ddim_step, ddim_timesteps, guided_eps
from ldm_train.diffusion.schedule import NoiseSchedule, build_schedule, make_betas

__all__ = [
    "Denoiser",
    "NoiseSchedule",
    "build_schedule",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "diffusion_loss",
    "drop_context",
    "guided_eps",
    "make_betas",
]
