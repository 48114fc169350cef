"""Whether a configuration's diffusion, model and sampling settings fit together: the one place.

:func:`check_config` runs once, when a command's config is validated (``ldm-train`` before any
work), and raises :class:`~ldm_train.config.ConfigError` whose lines each name exactly the keys
involved. The value sets of single keys are the config's own ``Literal`` types; the samplers'
names and settings come from the registry (:data:`~ldm_train.diffusion.samplers.SAMPLERS`).
"""
from __future__ import annotations

import difflib

from pydantic import ValidationError

from ldm_train.config import Config, ConfigError
from ldm_train.diffusion.samplers import SAMPLERS, settings_model

SCORE_BASED = ("vp_sde", "subvp_sde", "ve_sde", "ncsn")


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def sampler_problems(cfg: Config) -> list[str]:
    """``eval.sampler`` and every ``eval.samplers.NAME`` against the registry and the formulation."""
    ev, problems = cfg.eval, []
    names = ", ".join(SAMPLERS)
    if ev.sampler not in SAMPLERS:
        problems.append(f"eval.sampler: unknown sampler {ev.sampler!r}{_suggest(ev.sampler, SAMPLERS)}; one of {names}")
    for name, settings in ev.samplers.items():
        if name not in SAMPLERS:
            problems.append(f"eval.samplers.{name}: unknown sampler{_suggest(name, SAMPLERS)}; one of {names}")
            continue
        try:
            settings_model(name).model_validate(settings)
        except ValidationError as e:
            for err in e.errors():
                key = ".".join(str(x) for x in err["loc"])
                allowed = ", ".join(settings_model(name).model_fields)
                msg = (f"unknown key{_suggest(key, settings_model(name).model_fields)}; {name} takes {allowed}"
                       if err["type"] == "extra_forbidden" else f"{err['msg']} (got {err.get('input')!r})")
                problems.append(f"eval.samplers.{name}.{key}: {msg}")
    if ev.sampler in SAMPLERS and cfg.diffusion.formulation not in SAMPLERS[ev.sampler].formulations:
        fits = [n for n, s in SAMPLERS.items() if cfg.diffusion.formulation in s.formulations]
        accepted = SAMPLERS[ev.sampler].formulations
        kind = "score-based" if set(accepted) <= set(SCORE_BASED) else "discrete-time"
        problems.append(f"eval.sampler={ev.sampler!r} samples diffusion.formulation in {accepted} ({kind}), "
                        f"not {cfg.diffusion.formulation!r}; for it use eval.sampler in {tuple(fits)}")
    return problems


def formulation_problems(cfg: Config) -> list[str]:
    """Prediction type, schedule, learned variance and output channels against the formulation."""
    d, m, problems = cfg.diffusion, cfg.model, []
    if d.formulation in SCORE_BASED:
        if d.prediction_type != "epsilon":
            problems.append(f"diffusion.prediction_type={d.prediction_type!r}: diffusion.formulation="
                            f"{d.formulation!r} trains an ε-parameterised score (s = -ε̂/std); set diffusion.prediction_type=epsilon")
        if d.rescale_betas_zero_snr:
            problems.append("diffusion.rescale_betas_zero_snr rescales the discrete beta schedule of "
                            f"diffusion.formulation='ddpm', not {d.formulation!r}")
    elif d.prediction_type == "epsilon" and d.rescale_betas_zero_snr:
        problems.append("diffusion.prediction_type='epsilon' is ill-posed with the zero-terminal-SNR schedule of "
                        "diffusion.rescale_betas_zero_snr=true (alpha_bar_T = 0: x_0 cannot be recovered from eps); "
                        "use 'v_prediction' or 'sample' (Lin et al. 2024, sec. 3.2)")
    lv = d.iddpm.learned_variance
    if lv and d.formulation != "ddpm":
        problems.append(f"diffusion.iddpm.learned_variance is Improved DDPM's; it needs diffusion.formulation='ddpm', "
                        f"not {d.formulation!r}")
    if lv and m.out_channels != 2 * m.in_channels:
        problems.append(f"model.out_channels={m.out_channels}: diffusion.iddpm.learned_variance needs "
                        f"2 * model.in_channels = {2 * m.in_channels} (mean and variance interpolation v)")
    if not lv and m.out_channels != m.in_channels:
        problems.append(f"model.out_channels={m.out_channels} must equal model.in_channels={m.in_channels} "
                        "unless diffusion.iddpm.learned_variance")
    sampler = SAMPLERS.get(cfg.eval.sampler)
    if lv and sampler is not None and not sampler.reads_variance:
        readers = tuple(n for n, s in SAMPLERS.items() if s.reads_variance)
        problems.append(f"eval.sampler={cfg.eval.sampler!r} would ignore diffusion.iddpm.learned_variance; "
                        f"use eval.sampler in {readers}")
    return problems + _range_problems(cfg)


def _range_problems(cfg: Config) -> list[str]:
    d, problems = cfg.diffusion, []
    pairs = {"ve_sde": [("sde.sigma_min", d.sde.sigma_min, "sde.sigma_max", d.sde.sigma_max)],
             "vp_sde": [("sde.beta_min", d.sde.beta_min, "sde.beta_max", d.sde.beta_max)],
             "subvp_sde": [("sde.beta_min", d.sde.beta_min, "sde.beta_max", d.sde.beta_max)],
             "ncsn": [("ncsn.sigma_min", d.ncsn.sigma_min, "ncsn.sigma_max", d.ncsn.sigma_max)],
             "ddpm": [("beta_start", d.beta_start, "beta_end", d.beta_end)] if d.beta_schedule != "cosine" else []
             }[d.formulation]
    for lo_key, lo, hi_key, hi in pairs:
        if not lo < hi:
            problems.append(f"diffusion.{lo_key}={lo} must be below diffusion.{hi_key}={hi}")
    return problems


def check_config(cfg: Config, source: str = "<config>") -> None:
    """Raise :class:`ConfigError` listing every inconsistency, each naming its keys."""
    problems = sampler_problems(cfg) + formulation_problems(cfg)
    if problems:
        raise ConfigError(f"inconsistent configuration [in {source}]:\n" + "\n".join(f"  {p}" for p in problems))
