"""Pure-tensor diffusion maths: the forward processes, what the network predicts, the training
objectives and the samplers. No distributed/accelerator imports here (a test enforces it).

``schedule`` (DDPM's q(x_t | x_0)) and ``sdes`` (Song et al.'s SDEs, NCSN levels) are the
processes; ``parameterization`` converts between x_0, ε, v and the score; ``guidance`` is
classifier-free guidance; ``losses`` the objectives; ``samplers`` the registry ``SAMPLERS``;
``checks`` whether a configuration fits together.
"""
from ldm_train.diffusion.losses import build_objective
from ldm_train.diffusion.samplers import SAMPLERS, sample, sample_from_config
from ldm_train.diffusion.schedule import NoiseSchedule, build_schedule, make_betas

__all__ = ["SAMPLERS", "NoiseSchedule", "build_objective", "build_schedule", "make_betas", "sample",
           "sample_from_config"]
