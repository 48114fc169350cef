"""The samplers, one registry: ``SAMPLERS`` is the dispatch table, the values ``eval.sampler`` accepts
and the CLI's choices.

Every sampler has one shape (k-diffusion's ``sample_*``)::

    sample_NAME(model, x, grid, *, generator=None, callback=None, **its_own_settings) -> x_0

``model`` is the network already wrapped, once and outside the sampler, with classifier-free
guidance (:mod:`..guidance`) and converted to what the sampler's family calls
(:mod:`..parameterization`); ``x`` is the start noise scaled to the family's prior; ``grid`` the
noise levels it walks, noisiest first, made by the entry's grid function from the step count;
``callback(i, x)`` follows each step. The keyword-only settings after ``callback`` (of the sampler
and of its grid function) are the sampler's config keys, ``eval.samplers.NAME.*``, typed by their
annotations and checked with them.

To add a sampler: write ``sample_NAME`` of that shape (in the family's file, or a new one), then
add one line to ``SAMPLERS`` naming its family, grid and the formulations it accepts.
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, create_model

from ldm_train.config import DiffusionConfig, EvalConfig
from ldm_train.diffusion import parameterization as P
from ldm_train.diffusion.guidance import Net, guided
from ldm_train.diffusion.samplers.discrete import ddim_grid, ddpm_grid, sample_ddim, sample_ddpm
from ldm_train.diffusion.samplers.karras import karras_grid, sample_dpmpp_2m, sample_euler, sample_heun
from ldm_train.diffusion.samplers.langevin import ncsn_grid, sample_annealed_langevin
from ldm_train.diffusion.samplers.sde import sample_pc, sample_pf_ode, sde_grid
from ldm_train.diffusion.schedule import build_schedule
from ldm_train.diffusion.sdes import build_sde, ncsn_sigmas


@dataclass(frozen=True)
class Family:
    """How a guided network ``net_fn(x, t)`` becomes a family's ``model``, and its start sample."""

    name: str
    model: Callable[[P.ModelFn, Any, str], Any]  # (net_fn, process, prediction_type) -> model
    start: Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor]  # (noise, process, grid) -> x


DISCRETE = Family("discrete", lambda f, schedule, p: P.DiscreteModel(f, schedule, p), lambda n, proc, g: n)
SIGMA = Family("sigma", lambda f, schedule, p: P.sigma_denoiser(f, schedule, p), lambda n, proc, g: n * float(g[0]))
SDE = Family("sde", lambda f, sde, p: P.sde_score(f, sde), lambda n, sde, g: n * float(sde.marginal(torch.ones(1))[1]))
NCSN = Family("ncsn", lambda f, sigmas, p: P.ncsn_score(f, sigmas), lambda n, sigmas, g: n * float(g[0]))

DDPM_ONLY = ("ddpm",)
SDES = ("vp_sde", "subvp_sde", "ve_sde")


@dataclass(frozen=True)
class Sampler:
    fn: Callable[..., torch.Tensor]  # sample_NAME(model, x, grid, *, generator, callback, **settings)
    family: Family
    grid: Callable[..., torch.Tensor]  # grid(process, steps, **settings) -> levels, noisiest first
    formulations: tuple[str, ...]  # the diffusion.formulation values it samples
    reads_variance: bool = False  # uses Improved DDPM's learned variance


SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(sample_ddim, DISCRETE, ddim_grid, DDPM_ONLY),  # Song et al. 2021
    "ddpm": Sampler(sample_ddpm, DISCRETE, ddpm_grid, DDPM_ONLY, reads_variance=True),  # Ho et al.; Nichol & Dhariwal
    "euler": Sampler(sample_euler, SIGMA, karras_grid, DDPM_ONLY),  # Karras et al. 2022, Alg. 2 (Euler)
    "heun": Sampler(sample_heun, SIGMA, karras_grid, DDPM_ONLY),  # Karras et al. 2022, Alg. 2
    "dpmpp_2m": Sampler(sample_dpmpp_2m, SIGMA, karras_grid, DDPM_ONLY),  # Lu et al. 2022
    "pf_ode": Sampler(sample_pf_ode, SDE, sde_grid, SDES),  # Song et al. 2021, eq. 13
    "pc": Sampler(sample_pc, SDE, sde_grid, SDES),  # Song et al. 2021, Alg. 1
    "annealed_langevin": Sampler(sample_annealed_langevin, NCSN, ncsn_grid, ("ncsn",)),  # Song & Ermon 2019
}


# -- settings ---------------------------------------------------------------------------------
NOT_SETTINGS = {"generator", "callback"}


def _keyword_settings(fn: Callable) -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(fn, include_extras=True)
    return {name: (hints.get(name, Any), p.default) for name, p in inspect.signature(fn).parameters.items()
            if p.kind is p.KEYWORD_ONLY and name not in NOT_SETTINGS}


def settings_model(name: str) -> type[BaseModel]:
    """The pydantic model of ``eval.samplers.NAME``: the keyword-only settings of the sampler and
    of its grid function, with their defaults; unknown keys are refused."""
    entry = SAMPLERS[name]
    fields = {**_keyword_settings(entry.grid), **_keyword_settings(entry.fn)}
    return create_model(f"{name}_settings", __config__=ConfigDict(extra="forbid"), **fields)


def split_settings(name: str, settings: dict[str, Any]) -> tuple[dict, dict]:
    """Validated settings of sampler ``name``, as (grid keywords, sampler keywords)."""
    values = settings_model(name).model_validate(settings).model_dump()
    grid_keys = _keyword_settings(SAMPLERS[name].grid)
    return ({k: v for k, v in values.items() if k in grid_keys},
            {k: v for k, v in values.items() if k not in grid_keys})


# -- entry points -----------------------------------------------------------------------------
def build_process(cfg: DiffusionConfig):
    """What the formulation's samplers walk: the DDPM schedule, the forward SDE or NCSN's σ levels."""
    if cfg.formulation == "ddpm":
        return build_schedule(cfg)
    if cfg.formulation == "ncsn":
        return ncsn_sigmas(cfg)
    return build_sde(cfg)


def _progress(total: int, callback: Callable | None, name: str) -> tuple[Callable, Callable]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=name, leave=False)

    def step(i: int, x: torch.Tensor) -> None:
        bar.update(1)
        if callback is not None:
            callback(i, x)

    return step, bar.close


def sample(name: str, net_fn: P.ModelFn, noise: torch.Tensor, process, steps: int | None, *,
           prediction_type: P.PredictionType = "epsilon", generator: torch.Generator | None = None,
           callback: Callable[[int, torch.Tensor], None] | None = None, progress: bool = False,
           **settings) -> torch.Tensor:
    """x_0 from ``noise`` ~ N(0, I) with sampler ``name`` on ``process`` (:func:`build_process`).

    ``net_fn(x, t)`` is the network with its context bound and guidance applied
    (:func:`~ldm_train.diffusion.guidance.guided`); ``settings`` are the sampler's own keywords."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    entry = SAMPLERS[name]
    grid_kw, fn_kw = split_settings(name, settings)
    grid = entry.grid(process, steps, **grid_kw)
    model = entry.family.model(net_fn, process, prediction_type)
    x = entry.family.start(noise, process, grid)
    close = None
    if progress:
        callback, close = _progress(len(grid), callback, name)
    try:
        return entry.fn(model, x, grid, generator=generator, callback=callback, **fn_kw)
    finally:
        if close is not None:
            close()


def sample_from_config(net: Net, noise: torch.Tensor, context: torch.Tensor, null_context: torch.Tensor | None,
                       diffusion_cfg: DiffusionConfig, eval_cfg: EvalConfig, *,
                       generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """x_0 latents for ``context`` with ``eval.sampler``, ``eval.steps``, its ``eval.samplers``
    settings and ``eval.guidance_scale``, on the process of the ``diffusion`` section."""
    net_fn = guided(net, context, null_context, eval_cfg.guidance_scale)
    return sample(eval_cfg.sampler, net_fn, noise, build_process(diffusion_cfg), eval_cfg.steps,
                  prediction_type=diffusion_cfg.prediction_type, generator=generator, progress=progress,
                  **eval_cfg.sampler_settings())
