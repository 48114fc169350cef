"""Our ``diffusion`` section <-> a diffusers scheduler config (``scheduler/scheduler_config.json``).

diffusers keeps the training schedule (β range and shape, T, what the network predicts) in the
config of whichever sampler a pipeline ships (PNDM for SD 1.x, DDIM/Euler for others); the keys
are the same in every scheduler class, so one reader serves them all.
"""
from __future__ import annotations

from ..config import DiffusionConfig
from ..errors import UserError

# diffusers spells the cosine schedule of Improved DDPM "squaredcos_cap_v2".
TO_DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
FROM_DIFFUSERS_SCHEDULE = {v: k for k, v in TO_DIFFUSERS_SCHEDULE.items()}
# The keys of our diffusion section a scheduler config fixes: what the pretrained network learnt.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                 "rescale_betas_zero_snr")


class SchedulerConfigError(UserError):
    """A scheduler config that does not describe one of our schedules; the message names the file."""


def schedule_keys(raw: dict, source: str) -> dict:
    """{diffusion key: value} of :data:`SCHEDULE_KEYS` from a diffusers scheduler config dict."""
    kind = FROM_DIFFUSERS_SCHEDULE.get(raw.get("beta_schedule", "linear"))
    if kind is None:
        raise SchedulerConfigError(f"{source}: unsupported beta_schedule {raw.get('beta_schedule')!r} "
                                   f"(supported: {', '.join(FROM_DIFFUSERS_SCHEDULE)})")
    prediction = raw.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise SchedulerConfigError(f"{source}: unsupported prediction_type {prediction!r}")
    return {
        "num_train_timesteps": int(raw.get("num_train_timesteps", 1000)),
        "beta_schedule": kind,
        "beta_start": float(raw.get("beta_start", 0.0001)),
        "beta_end": float(raw.get("beta_end", 0.02)),
        "prediction_type": prediction,
        "rescale_betas_zero_snr": bool(raw.get("rescale_betas_zero_snr", False)),
    }


def ddim_scheduler(cfg: DiffusionConfig):
    """The diffusers ``DDIMScheduler`` equal to our schedule and our DDIM sampler's defaults
    (``eval.samplers.ddim``: leading spacing, steps_offset 1, set_alpha_to_one)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=TO_DIFFUSERS_SCHEDULE[cfg.beta_schedule],
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        timestep_spacing="leading",
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
    )
