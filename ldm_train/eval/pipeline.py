"""Everything needed to sample, loaded from a training run folder or from an export folder.

A run folder has ``config.yaml`` and ``checkpoints/``; its latest checkpoint's EMA weights are
used, with the VAE and text tower named by the run's config. An export folder has
``model_index.json`` (see ``ldm_train.export``) and nothing outside it is read.
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
from ..text.encoder import TextEncoder, load_text_encoder
from ..train.checkpoint import latest_checkpoint, load_weights

# diffusers spells the cosine schedule of Improved DDPM "squaredcos_cap_v2".
TO_DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
FROM_DIFFUSERS_SCHEDULE = {v: k for k, v in TO_DIFFUSERS_SCHEDULE.items()}
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
    kind = FROM_DIFFUSERS_SCHEDULE.get(raw.get("beta_schedule"))
    if kind is None:
        raise PipelineError(f"{folder / 'scheduler_config.json'}: unsupported beta_schedule {raw.get('beta_schedule')!r}")
    return DiffusionConfig(
        num_train_timesteps=int(raw["num_train_timesteps"]),
        beta_schedule=kind,
        beta_start=float(raw["beta_start"]),
        beta_end=float(raw["beta_end"]),
        prediction_type=raw.get("prediction_type", "epsilon"),
        rescale_betas_zero_snr=bool(raw.get("rescale_betas_zero_snr", False)),
    )


def _unet(model_cfg: ModelConfig, weights: dict[str, torch.Tensor], device) -> torch.nn.Module:
    unet = build_unet(model_cfg)
    unet.load_state_dict({k: v.float() for k, v in weights.items()})
    return unet.to(device).eval().requires_grad_(False)


def _from_export(folder: Path, device) -> Pipeline:
    index = json.loads((folder / "model_index.json").read_text())
    model_cfg, weights = read_unet(folder / index.get("unet", "unet"))
    diffusion = diffusion_config_from_scheduler(folder / "scheduler")
    return Pipeline(
        _unet(model_cfg, weights, device),
        load_vae(folder / "vae").to(device),
        load_text_encoder(folder / "text_encoder").to(device),
        build_schedule(diffusion),
        diffusion,
        index["latent_shape"],
        f"export {folder}",
    )


def _from_run(folder: Path, device) -> Pipeline:
    cfg: Config = load_config(folder / "config.yaml", migrate_old=True)  # also a run from before keys moved
    cfg.run.dir = str(folder)  # "{run}" paths follow the folder wherever it was moved
    ckpt = latest_checkpoint(folder / "checkpoints")
    if ckpt is None:
        raise PipelineError(f"run folder {folder} has no complete checkpoint under checkpoints/; train first")
    manifest = read_manifest(cfg.path(cfg.latents.dir) / "train")
    return Pipeline(
        _unet(cfg.model, load_weights(ckpt, "ema"), device),
        load_vae(cfg.path(cfg.autoencoder.path), cfg.autoencoder.dtype).to(device),
        load_text_encoder(cfg.path(cfg.text.dir)).to(device),
        build_schedule(cfg.diffusion),
        cfg.diffusion,
        manifest["latent_shape"],
        f"run {folder} ({ckpt.name}, EMA)",
    )


def load_pipeline(path: str | Path, device: torch.device) -> Pipeline:
    folder = Path(path)
    if (folder / "model_index.json").is_file():
        return _from_export(folder, device)
    if (folder / "config.yaml").is_file():
        try:
            return _from_run(folder, device)
        except ConfigError as e:
            raise PipelineError(f"{folder}/config.yaml: {e}") from None
    raise PipelineError(
        f"{folder} is neither an export (model_index.json) nor a run folder (config.yaml + checkpoints/)"
    )
