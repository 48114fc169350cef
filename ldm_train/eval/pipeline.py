"""Everything needed to sample, loaded from a training run folder or from an export folder.

A run folder has ``config.yaml`` and ``checkpoints/``; its latest checkpoint's EMA weights are
used (or those of ``step``; ``RUN/checkpoints/step-N`` names one too), with the VAE and text tower
named by the run's config. An export folder, or any diffusers Stable Diffusion pipeline folder,
has ``model_index.json`` (see ``ldm_train.export``) and nothing outside it is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ..errors import UserError
from ..autoencoder.vae import load_vae
from ..config import Config, ConfigError, DiffusionConfig, ModelConfig, load_config, migrate
from ..diffusion import NoiseSchedule, build_schedule
from ..latents.cache import read_manifest
from ..model import build_unet
from ..model.load import read_unet
from ..pretrained.scheduler import schedule_keys
from ..text import TextEncoder, load_text, load_text_components
from ..train.checkpoint import load_weights, pick_checkpoint, split_step_folder
from ..train.lora import apply_adapter, base_unet, checkpoint_adapter, split_parts, text_with_adapter

DIFFUSION_FILE = "ldm_train_diffusion.json"


class PipelineError(UserError):
    """A path that is neither a run folder with a checkpoint nor an export folder."""


@dataclass
class Pipeline:
    unet: torch.nn.Module
    vae: AutoencoderKL
    text: TextEncoder
    schedule: NoiseSchedule
    diffusion: DiffusionConfig
    latent_shape: list[int]
    source: str


def diffusion_config_from_scheduler(folder: Path) -> DiffusionConfig:
    """Our full ``diffusion`` section when the export wrote it, else what a diffusers
    scheduler config says (schedule, betas, prediction type, zero-SNR rescaling)."""
    if (folder / DIFFUSION_FILE).is_file():  # an export from before the keys moved: moved back in place
        raw = migrate({"diffusion": json.loads((folder / DIFFUSION_FILE).read_text())})["diffusion"]
        return DiffusionConfig.model_validate(raw)
    raw = json.loads((folder / "scheduler_config.json").read_text())
    return DiffusionConfig(**schedule_keys(raw, str(folder / "scheduler_config.json")))


def _unet(model_cfg: ModelConfig, weights: dict[str, torch.Tensor], device) -> torch.nn.Module:
    unet = build_unet(model_cfg)
    unet.load_state_dict({k: v.float() for k, v in weights.items()})
    return unet.to(device).eval().requires_grad_(False)


def _from_export(folder: Path, device) -> Pipeline:
    index = json.loads((folder / "model_index.json").read_text())
    model_cfg, weights = read_unet(folder / "unet")
    diffusion = diffusion_config_from_scheduler(folder / "scheduler")
    unet = json.loads((folder / "unet" / "config.json").read_text())
    # exports before issue 13 wrote latent_shape into model_index.json; a diffusers pipeline says it in unet/
    shape = index.get("latent_shape") or [unet["in_channels"], unet["sample_size"], unet["sample_size"]]
    return Pipeline(
        _unet(model_cfg, weights, device),
        load_vae(folder / "vae").to(device),
        load_text_components(folder).to(device),
        build_schedule(diffusion),
        diffusion,
        list(shape),
        f"export {folder}",
    )


def _from_run(folder: Path, device, step: int | None) -> Pipeline:
    cfg: Config = load_config(folder / "config.yaml", migrate_old=True)  # also a run from before keys moved
    cfg.run.dir = str(folder)  # "{run}" paths follow the folder wherever it was moved
    ckpt = pick_checkpoint(folder / "checkpoints", step)
    if ckpt is None:
        raise PipelineError(f"run folder {folder} has no complete checkpoint under checkpoints/; train first")
    manifest = read_manifest(cfg.path(cfg.latents.dir) / "train")
    text = load_text(cfg.text, cfg.path(cfg.text.dir))
    if cfg.train.lora.enabled:  # the frozen base as training built it + the EMA adapter(s)
        unet_state, text_state = split_parts(checkpoint_adapter(ckpt, "ema"))
        unet = apply_adapter(base_unet(cfg.model, cfg.run.seed), unet_state, cfg.train.lora)
        unet = unet.to(device)
        if cfg.train.lora.text_encoder:  # the text tower with its EMA adapter: prompts and the null caption
            text = text_with_adapter(text, text_state, cfg.train.lora)
    else:
        unet = _unet(cfg.model, load_weights(ckpt, "ema"), device)
    return Pipeline(
        unet,
        load_vae(cfg.path(cfg.autoencoder.path), cfg.autoencoder.dtype).to(device),
        text.to(device),
        build_schedule(cfg.diffusion),
        cfg.diffusion,
        manifest["latent_shape"],
        f"run {folder} ({ckpt.name}, EMA{' LoRA adapter' if cfg.train.lora.enabled else ''})",
    )


def resolve_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, int | None]:
    """(folder, step) from ``--checkpoint`` and ``--step``: ``RUN/checkpoints/step-N`` is (RUN, N)."""
    folder, named = split_step_folder(Path(path))
    if named is not None and step is not None and named != step:
        raise PipelineError(f"--checkpoint {path} is step {named} but --step says {step}")
    return folder, step if step is not None else named


def load_pipeline(path: str | Path, device: torch.device, step: int | None = None) -> Pipeline:
    folder, step = resolve_checkpoint(path, step)
    if (folder / "model_index.json").is_file():
        if step is not None:
            raise PipelineError(f"{folder} is an export (one set of weights): --step applies to run folders")
        return _from_export(folder, device)
    if (folder / "config.yaml").is_file():
        try:
            return _from_run(folder, device, step)
        except ConfigError as e:
            raise PipelineError(f"{folder}/config.yaml: {e}") from None
    raise PipelineError(
        f"{folder} is neither an export or diffusers pipeline (model_index.json) nor a run folder "
        "(config.yaml + checkpoints/)"
    )
