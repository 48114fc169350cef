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

# Schedules/losses extensions: zero terminal SNR, loss weighting, learned variance (L_vlb), score matching.
from ldm_train.diffusion.losses import loss_weight, sample_timesteps  # noqa: E402
from ldm_train.diffusion.schedule import (  # noqa: E402
    check_combination,
    check_prediction,
    rescale_zero_terminal_snr,
)
from ldm_train.diffusion.score_losses import (  # noqa: E402
    dsm_loss,
    geometric_sigmas,
    max_pairwise_distance,
    num_noise_scales,
    sliced_score_matching_loss,
)
from ldm_train.diffusion.vlb import (  # noqa: E402
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    model_log_variance,
    normal_kl,
    vlb_term,
)

__all__ += [
    "check_combination",
    "check_prediction",
    "discretized_gaussian_log_likelihood",
    "dsm_loss",
    "geometric_sigmas",
    "hybrid_loss",
    "loss_weight",
    "max_pairwise_distance",
    "model_log_variance",
    "normal_kl",
    "num_noise_scales",
    "rescale_zero_terminal_snr",
    "sample_timesteps",
    "sliced_score_matching_loss",
    "vlb_term",
]

# Samplers: DDPM ancestral (+ Improved DDPM respacing / learned variance), Karras et al. grid
# (Euler, Heun), DPM-Solver++(2M), and the network -> D(x, σ) bridge with classifier-free guidance.
from ldm_train.diffusion.ddpm import ddpm_sample, ddpm_step, ddpm_timesteps  # noqa: E402
from ldm_train.diffusion.denoisers import cfg_model, discrete_sigmas, sigma_to_t, x0_denoiser  # noqa: E402
from ldm_train.diffusion.karras import (  # noqa: E402
    karras_sample,
    karras_sigmas,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)

__all__ += [
    "cfg_model",
    "ddpm_sample",
    "ddpm_step",
    "ddpm_timesteps",
    "discrete_sigmas",
    "karras_sample",
    "karras_sigmas",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "sigma_to_t",
    "x0_denoiser",
]

# Score-based SDEs (Song et al. 2021), annealed Langevin (NCSN) and the exact Gaussian-mixture denoiser.
from ldm_train.diffusion.analytic import (  # noqa: E402
    GaussianMixture,
    as_discrete_model,
    as_vp_score,
    sliced_wasserstein,
)
from ldm_train.diffusion.langevin import annealed_langevin_sample  # noqa: E402
from ldm_train.diffusion.sde import (  # noqa: E402
    VESDE,
    VPSDE,
    SubVPSDE,
    ode_drift,
    pc_sample,
    probability_flow_sample,
    reverse_drift,
    tweedie_denoise,
)

__all__ += [
    "GaussianMixture",
    "SubVPSDE",
    "VESDE",
    "VPSDE",
    "annealed_langevin_sample",
    "as_discrete_model",
    "as_vp_score",
    "ode_drift",
    "pc_sample",
    "probability_flow_sample",
    "reverse_drift",
    "sliced_wasserstein",
    "tweedie_denoise",
]
